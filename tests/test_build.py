import subprocess
import sys

import torch

import memboost


def test_build_info_describes_this_build():
    info = memboost.build_info()
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda_kernels"], bool)
    if info["cuda_kernels"]:
        assert "9.0" in [a.replace("+PTX", "") for a in info["cuda_archs"]], info["cuda_archs"]
        assert info["torch_cuda"]
    else:
        assert info["cuda_archs"] == []


def test_every_op_has_cpu_and_matching_cuda_kernels():
    ops = ["pack_2bit", "unpack_2bit", "pack_4bit", "unpack_4bit", "mixed_dequantize", "mixed_linear"]
    cuda = memboost.build_info()["cuda_kernels"]
    for op in ops:
        name = f"memboost::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA") == cuda, name


def test_import_under_another_torch_version_fails_clearly():
    code = "import torch; torch.__version__ = '0.0.1'; import memboost"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode != 0
    assert "built against torch" in res.stderr and "0.0.1" in res.stderr
    assert "pip install --no-build-isolation" in res.stderr


def test_import_without_gpu_driver_works():
    # CUDA_VISIBLE_DEVICES="" hides every GPU, as on a machine without a driver.
    code = "import memboost, torch; assert not torch.cuda.is_available(); print(memboost.build_info()['cuda_available'])"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
