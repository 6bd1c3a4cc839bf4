"""Benchmarks on Ray Tune: sweep specs, repeated trials, confidence intervals, cost per useful outcome.

- :mod:`~aifactory.bench.spec`: typed sweep specs (grid of knobs x repeats, trial kind, tenant).
- :mod:`~aifactory.bench.runner`: ``run_sweep`` runs a spec as Tune trials on the connected cluster.
- :mod:`~aifactory.bench.trials`: the trial kinds (serving under load, training to a quality target): the
  self-contained MLP ones, and the factory's own components (``completions_trial``: the completions app;
  ``embeddings_trial``: the MiniLM app; ``gpt_trial``: an :mod:`aifactory.train` run of the GPT).
- :mod:`~aifactory.bench.stats`, :mod:`~aifactory.bench.analysis`: CIs, MLPerf aggregation, Pareto, SLO pick.
- :mod:`~aifactory.bench.results`: versioned records under the factory home.
- :mod:`~aifactory.bench.compare`, :mod:`~aifactory.bench.report`: regressions; Markdown + PNG reports.

Importing this package is light; Ray, Tune, Serve and torch load where they are used.
"""
