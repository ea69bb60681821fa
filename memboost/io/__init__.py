"""Files: safetensors with atomic writes and sharded sources, memboost
checkpoint folders, and GGUF export for llama.cpp.

serialization.py  save/load_safetensors, atomic_write, SafetensorsSource over shards
checkpoint.py     save_quantized / load_quantized folders (transformers-compatible)
streaming.py      quantize_folder: a safetensors folder quantized block by block into such a folder
gguf/             export.py (export_gguf), quants.py (llama.cpp's block quantizers)
"""

from .serialization import atomic_write, load_safetensors, save_safetensors
from .checkpoint import load_quantized, save_quantized
from .streaming import quantize_folder

__all__ = ["atomic_write", "load_safetensors", "save_safetensors", "load_quantized", "save_quantized",
           "quantize_folder"]
