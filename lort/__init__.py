"""lort: low-rank + ternary weight decomposition (W ~ alpha*T + A @ B.T).

    import lort
    q, errors = lort.decompose(w, rank=64, iters=10)     # a memboost QuantizedTensor
    lort.save("model.lort", ...) / lort.load("model.lort")

The solver and the stored tensor live in memboost.lort (so every memboost
path, from quantize_model to save_quantized, knows the format); this package
adds the .lort file (lort.fileformat) and the lort-compress / lort-infer
commands.
"""

from memboost.formats.lort import LoRTQuantizedTensor, best_ternary_fit, decompose, resolve_rank, stored_bits
from memboost.nn import LoRTLinear

__all__ = ["LoRTQuantizedTensor", "LoRTLinear", "best_ternary_fit", "decompose", "resolve_rank", "stored_bits"]
