"""Whole-model passes: calibration, quantization of every linear layer, and
the per-layer bits plan.

quantize.py  calibrate, quantize_model, quantize_linears_, load_quantized_, QuantizationReport
plan.py      allocate_ratio_4bit, output_sensitivity (4-bit groups placed per layer at a bit budget),
             weights_plan (the same from the weights alone: quantize_model's default without calibration)
"""

from .quantize import QuantizationReport, calibrate, load_quantized_, quantize_linears_, quantize_model
from .plan import allocate_ratio_4bit, output_sensitivity

__all__ = ["QuantizationReport", "calibrate", "load_quantized_", "quantize_linears_", "quantize_model",
           "allocate_ratio_4bit", "output_sensitivity"]
