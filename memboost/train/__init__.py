"""Training on quantized weights: QLoRA adapters over NF4 (qlora.py), the VSA
gradient sketch (vsa.py) and its DistributedDataParallel hook (distributed.py),
healing a quantized model against the float one (heal.py)."""

from . import qlora, vsa, distributed, heal

__all__ = ["qlora", "vsa", "distributed", "heal"]
