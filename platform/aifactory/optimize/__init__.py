"""Model optimization: quantized and distilled variants as registry versions, each behind a quality gate.

- :mod:`aifactory.optimize.quantize`: int8 dynamic (CPU), bf16, fp8 weight-only (GPUs with fp8 support),
  and how a serving replica rebuilds a variant's module structure before loading its weights.
- :mod:`aifactory.optimize.gate`: the variant's validation loss against its parent's on the parent's dataset
  validation split, the pass/fail rule, and registration with lineage.
- :mod:`aifactory.optimize.distill`: a Ray Train job (FSDP2 + bf16) training a smaller student on a
  teacher's soft targets plus the data's hard targets.

Importing this package is light; torch and Ray are imported inside the modules that use them.
"""
