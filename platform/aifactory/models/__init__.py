"""Model definitions. Import submodules explicitly (``from aifactory.models.gpt import GPT``): they pull in torch."""
