"""Training recipes for ``python -m jobs.*`` and scripts in this checkout: the shipped ones, re-exported.

The recipes live in the library (:mod:`aifactory.recipes.training`), so a wheel install finds them too.
Add your own anywhere importable and name it by import path (``--recipe mypkg.recipes:big``) or register
it in the ``aifactory.recipes`` entry-point group; see :mod:`aifactory.recipes`.
"""

from aifactory.recipes.training import bench_state_heavy, pipeline, tiny

__all__ = ["bench_state_heavy", "pipeline", "tiny"]
