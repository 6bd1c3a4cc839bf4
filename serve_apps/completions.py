"""Text completions from a registry model version, OpenAI-compatible (POST /v1/completions, GET /v1/models).

    serve run serve_apps.completions:app_builder model_name=tiny-gpt
    serve deploy serve_apps/completions.yaml        # or: factory serve deploy --model tiny-gpt

The deployments (ingress, interactive/batch SLO classes, canary) live in aifactory.serve.apps.completions;
this recipe only names them for `serve run` / Serve config files.
"""

from aifactory.serve.apps.completions import app_builder
from aifactory.serve.config import CompletionsArgs

__all__ = ["CompletionsArgs", "app_builder"]
