"""memboost's one exception family.

Every error memboost raises for bad arguments, bad quantized state or a bad
file is a MemboostError, which is a ValueError: `except ValueError` catches
them all, `except memboost.MemboostError` catches only ours. A wrong type is
a MemboostTypeError, which is also a TypeError. The native ops check their
arguments in C++ and raise plain ValueError with the same kind of message
(argument name, what was expected, torch's dtype names).
"""

import torch

from ._slices import row_slices


class MemboostError(ValueError):
    """Bad input to memboost: an argument, a quantized state or a file. The
    message names the argument, key or file and says what was expected."""


class MemboostTypeError(MemboostError, TypeError):
    """An argument of the wrong type (also a TypeError)."""


def check_float_weight(w, name: str = "w") -> None:
    """The checks every quantizer makes on the weight it is given."""
    if not isinstance(w, torch.Tensor):
        raise MemboostTypeError(f"'{name}' must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise MemboostTypeError(f"'{name}' must be torch.float16, torch.bfloat16 or torch.float32, got {w.dtype}")
    if w.numel() == 0:
        raise MemboostError(f"'{name}' is empty (shape {tuple(w.shape)})")
    # Checked a slice at a time: isfinite's temporaries are one slice's, not a copy of a 0.5 G-weight output
    # layer (2.5 GB for 128256 x 4096 in bfloat16).
    for piece in row_slices(w.reshape(-1) if w.is_contiguous() else w):
        if not bool(torch.isfinite(piece).all()):
            raise MemboostError(f"'{name}' contains NaN or Inf values")


def check_device(device, name: str = "device") -> torch.device:
    """torch.device(device) when this machine has that device; else a
    MemboostError naming `name` (say, no GPU for 'cuda') before any work."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MemboostError(f"'{name}' must be a device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MemboostError(f"'{name}' is {str(device)!r}, but this machine has no usable CUDA GPU "
                                "(torch.cuda.is_available() is False); use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MemboostError(f"'{name}' is {str(device)!r}, but this machine has {torch.cuda.device_count()} "
                                "CUDA device(s)")
    return dev
