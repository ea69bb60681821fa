"""Loads the native library memboost._C, after checking it was built for the
torch that is imported (a mismatch otherwise fails with an obscure loader
error, or worse, loads and crashes)."""

import torch

_REBUILD = "rebuild it with: pip install --no-build-isolation --no-deps --force-reinstall -e ."

try:
    from . import _build_info
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(f"memboost's native library has not been built ({exc}); {_REBUILD}") from exc

if torch.__version__ != _build_info.TORCH_VERSION:
    raise ImportError(
        f"memboost was built against torch {_build_info.TORCH_VERSION} but torch {torch.__version__} "
        f"is imported; the C++ ABI differs between versions, so {_REBUILD}"
    )

try:
    from . import _C as C  # registers the ops with the dispatcher; C.bind_op: memboost.ops
except ImportError as exc:
    raise ImportError(f"memboost._C failed to load ({exc}); {_REBUILD}") from exc


def build_info() -> dict:
    """What the native library was compiled against and for."""
    archs = [a for a in _build_info.CUDA_ARCHS.split(";") if a]
    return {
        "torch_version": _build_info.TORCH_VERSION,
        "torch_cuda": _build_info.TORCH_CUDA or None,
        "cuda_kernels": bool(_build_info.WITH_CUDA),
        "cuda_archs": archs,
        "cuda_compiler": _build_info.CUDA_COMPILER_VERSION or None,
        # the nvcc flags of the CUDA kernels (recorded by CPU-only builds too)
        "cuda_flags": getattr(_build_info, "CUDA_FLAGS", "").split(),
        "cuda_available": torch.cuda.is_available(),
    }


def cuda_kernels_usable() -> bool:
    """True when CUDA kernels were compiled and a CUDA device is present."""
    return bool(_build_info.WITH_CUDA) and torch.cuda.is_available()
