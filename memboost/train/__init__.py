"""Training on quantized weights: QLoRA adapters over NF4 (qlora.py), the VSA
gradient sketch (vsa.py) and its DistributedDataParallel hook (distributed.py)."""

from . import qlora, vsa, distributed

__all__ = ["qlora", "vsa", "distributed"]
