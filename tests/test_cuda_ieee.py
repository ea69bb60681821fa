"""The NF4 quantizer's GPU arithmetic is IEEE float32 under the project's nvcc
flags: its PTX has no flush-to-zero and no approximate reciprocal or
division (issue 22: --use_fast_math turned the 1e-38 floor into 0 and an
all-zero block into NaN codes). This needs nvcc, not a GPU."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import memboost

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)

KERNEL = r"""
#include "common/nf4.h"
using namespace memboost::nf4;
__global__ void quantizer(const float* w, const float* absmax, const float* map, float* out, unsigned char* codes) {
  const int i = threadIdx.x;
  codes[i] = nearest_code(w[i] * inverse_absmax(absmax[0]));
  codes[64 + i] = nested_map_code(map, w[i], nested_inverse(absmax[1]));
  out[i] = nested_scale(map, codes[i], absmax[2], absmax[3]);
}
"""


def _ptx(tmp_path, flags):
    src = tmp_path / "quantizer.cu"
    src.write_text(KERNEL)
    out = tmp_path / "quantizer.ptx"
    # nvcc is not ours to sanitize: under make test-asan the sanitizer runtime
    # is preloaded into every process, and nvcc crashes with it
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
    subprocess.run([NVCC, *flags, "-arch=sm_80", "-ptx", f"-I{CSRC}", str(src), "-o", str(out)], check=True,
                   capture_output=True, text=True, env=env)
    return out.read_text()


@pytest.mark.cuda
@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed (the CUDA toolkit compiles this check)")
def test_quantizer_ptx_is_ieee(tmp_path):
    flags = memboost.build_info()["cuda_flags"]
    assert flags, "this build did not record its CUDA flags (rebuild)"
    assert "--use_fast_math" not in flags
    ptx = _ptx(tmp_path, flags)
    body = ptx[ptx.index(".entry"):]
    assert "div.rn.f32" in body or "rcp.rn.f32" in body  # the division is there, and exact
    assert ".ftz" not in body and ".approx" not in body
    # the check can fail: the old flags (fast math) put flush-to-zero back
    fast = _ptx(tmp_path, ["-O3", "--use_fast_math", "--expt-relaxed-constexpr"])
    assert ".ftz" in fast[fast.index(".entry"):]
