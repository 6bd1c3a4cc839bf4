"""Optimization recipes for ``python -m jobs.*`` and scripts in this checkout: the shipped ones, re-exported.

The recipes live in the library (:mod:`aifactory.recipes.optimization`); see :mod:`aifactory.recipes` for
adding your own (an import path ``module:function`` or the ``aifactory.recipes`` entry-point group).
"""

from aifactory.recipes.optimization import (
    bench_parent, bench_student, quantize_auto, quantize_bf16, quantize_fp8_weight, quantize_int8_dynamic, tiny_student,
)

__all__ = ["bench_parent", "bench_student", "quantize_auto", "quantize_bf16", "quantize_fp8_weight",
           "quantize_int8_dynamic", "tiny_student"]
