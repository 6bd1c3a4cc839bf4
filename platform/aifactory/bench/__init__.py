"""Measurement: benchmark sweeps on Ray Tune and the one toolkit every benchmark of the factory uses.

The toolkit (also what ``benchmarks/*.py`` and ``factory run``'s serve stage measure with):
:mod:`~aifactory.bench.loadgen` (the one HTTP load generator: closed and open loop, 2xx = success, 429 and
errors apart), :mod:`~aifactory.bench.stats` (percentiles, CIs, paired ratios), :mod:`~aifactory.bench.context`
(where and how a figure was measured), :mod:`~aifactory.bench.results` (versioned run records, priced),
:mod:`~aifactory.bench.report` (Markdown reports and the one chart helper).

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
