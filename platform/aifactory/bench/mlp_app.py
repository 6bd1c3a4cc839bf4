"""The self-contained serving trial's app: a torch MLP behind ``@serve.batch``, knobs from its config.

Imported by the ``serve-mlp`` trial kind only (it imports Ray Serve; torch loads inside the replica).
The request body is ``{"inputs": [float, ...]}`` of ``input_dim`` values; the answer is the argmax class
and the replica's batch size for that request, so a benchmark can see batching happen.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from aifactory.bench.spec import MLPModelSpec, ServingKnobs


@serve.deployment
class MLPReplica:
    def __init__(self, model: dict[str, Any], knobs: dict[str, Any], seed: int = 0):
        import torch

        # Validate at the boundary: the deployment's args arrive as plain dicts.
        self.spec = MLPModelSpec.model_validate(model)
        knobs_ = ServingKnobs.model_validate(knobs)
        torch.manual_seed(seed)
        layers: list[torch.nn.Module] = []
        width = self.spec.input_dim
        for _ in range(self.spec.num_layers):
            layers += [torch.nn.Linear(width, self.spec.hidden_dim), torch.nn.GELU()]
            width = self.spec.hidden_dim
        layers.append(torch.nn.Linear(width, self.spec.output_dim))
        self.net = torch.nn.Sequential(*layers).eval()
        self.torch = torch
        # @serve.batch's knobs come from the trial's configuration, not literals.
        self.infer.set_max_batch_size(knobs_.max_batch_size)
        self.infer.set_batch_wait_timeout_s(knobs_.batch_wait_timeout_s)

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)
    async def infer(self, rows: list[list[float]]) -> list[dict[str, int]]:
        with self.torch.inference_mode():
            logits = self.net(self.torch.tensor(rows, dtype=self.torch.float32))
        classes = logits.argmax(dim=-1).tolist()
        return [{"class": c, "batch": len(rows)} for c in classes]

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "body is not JSON", "field": "<body>"}, status_code=400)
        rows = body.get("inputs") if isinstance(body, dict) else None
        if (not isinstance(rows, list) or len(rows) != self.spec.input_dim
                or not all(isinstance(x, (int, float)) for x in rows)):
            return JSONResponse(
                {"error": f"inputs must be a list of {self.spec.input_dim} numbers", "field": "inputs"}, status_code=422)
        return JSONResponse(await self.infer(rows))


def build_app(*, model: MLPModelSpec, knobs: ServingKnobs, replica_num_cpus: float, tenant: str, seed: int = 0):
    """The Serve application of one serving configuration, tagged with its tenant through env vars."""
    return MLPReplica.options(
        num_replicas=knobs.num_replicas,
        # Batching needs requests queued at the replica: allow at least a full batch in flight.
        max_ongoing_requests=max(8, 2 * knobs.max_batch_size),
        # Per-request access logs of a load test would flood the driver's console.
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
        ray_actor_options={
            "num_cpus": replica_num_cpus,
            "runtime_env": {"env_vars": {"AIFACTORY_TENANT": tenant, "OMP_NUM_THREADS": "1"}},
        },
    ).bind(model.model_dump(), knobs.model_dump(mode="json"), seed)
