"""GGUF export: export.py writes the file llama.cpp loads; quants.py holds
llama.cpp's block quantizers (Q4_0, Q8_0, IQ4_NL, K-quants, TQ1_0/TQ2_0)."""

from .export import export_gguf, export_lora_adapter, gguf_state_dict

__all__ = ["export_gguf", "export_lora_adapter", "gguf_state_dict"]
