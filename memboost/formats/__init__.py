"""The quantized weight formats, one module each, and the container they share.

tensor.py   QuantizedTensor: plain tensors + JSON metadata, and the format registry
mixed.py    mixed 2/4/16-bit groups with outliers (arXiv 2311.16442)
ternary.py  BitNet b1.58 ternary weights
nf4.py      4-bit NormalFloat, byte for byte with bitsandbytes
lort.py     LoRT: ternary plus a low-rank correction

Importing a format module registers it, so every layer, file and tool above
this package talks to the container alone.
"""

from .tensor import QuantizedTensor
from . import mixed, ternary, nf4, lort

__all__ = ["QuantizedTensor", "mixed", "ternary", "nf4", "lort"]
