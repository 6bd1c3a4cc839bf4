"""Training: typed job configs, FSDP2/DDP parallelism with bf16 mixed precision, the Ray Train worker loop,
DCP checkpoints with resume, validation gate, registration, per-run metrics and reruns.

``aifactory.train.config`` is light (pydantic only); the other modules import torch and Ray Train.
"""
