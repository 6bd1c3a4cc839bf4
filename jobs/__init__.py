"""Recipes and entrypoints of the factory's jobs: `python -m jobs.<verb>` (thin over the aifactory library)."""
