"""The quantized weight formats, one module each, and the container they share.

tensor.py   QuantizedTensor: plain tensors + JSON metadata, and the format registry
mixed.py    mixed 2/4/16-bit groups with outliers (arXiv 2311.16442)
ternary.py  BitNet b1.58 ternary weights
nf4.py      4-bit NormalFloat, byte for byte with bitsandbytes
lort.py     LoRT: ternary plus a low-rank correction
int8.py     int8 weights in llama.cpp's Q8_0 layout (the output layer for generation)

Importing a format module registers it, so every layer, file and tool above
this package talks to the container alone.
"""

from .tensor import QuantizedTensor
from . import mixed, ternary, nf4, lort, int8

__all__ = ["QuantizedTensor", "mixed", "ternary", "nf4", "lort", "int8"]
