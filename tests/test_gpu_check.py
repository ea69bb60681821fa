"""`make gpu-check` without a GPU: it stops at once with one line saying
what is missing and exit status 2, before building anything."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bin_with(tmp_path, name=None, script=""):
    """A PATH of one folder, optionally holding a fake `name` program."""
    folder = tmp_path / "bin"
    folder.mkdir()
    if name:
        exe = folder / name
        exe.write_text("#!/bin/sh\n" + script)
        exe.chmod(0o755)
    return str(folder)


def _run_check(tmp_path, path_dir):
    env = dict(os.environ, PATH=path_dir)
    build = tmp_path / "gpu-build"
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--build-dir", str(build)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    return out, build


def test_no_nvidia_smi(tmp_path):
    out, build = _run_check(tmp_path, _bin_with(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "gpu-check: no NVIDIA GPU: nvidia-smi is not on PATH (this check needs a machine with an NVIDIA GPU and "
        "its driver)"]
    assert not build.exists()


def test_driver_without_gpu(tmp_path):
    smi = _bin_with(tmp_path, "nvidia-smi", "echo 'NVIDIA-SMI has failed because it could not communicate with the "
                                            "NVIDIA driver.'\nexit 9\n")
    out, build = _run_check(tmp_path, smi)
    assert out.returncode == 2
    assert out.stderr.strip() == ("gpu-check: no NVIDIA GPU: `nvidia-smi -L` lists none (NVIDIA-SMI has failed "
                                  "because it could not communicate with the NVIDIA driver.)")
    assert not build.exists()


def test_torch_without_cuda(tmp_path, monkeypatch):
    import torch

    gpu_check = _load()
    monkeypatch.setenv("PATH", _bin_with(tmp_path, "nvidia-smi", "echo 'GPU 0: NVIDIA H100 (UUID: GPU-0)'\n"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(gpu_check.Unavailable, match=r"torch .* sees no CUDA device"):
        gpu_check.preflight()


def test_make_target(tmp_path):
    make = shutil.which("make")
    env = dict(os.environ, PATH=_bin_with(tmp_path))
    out = subprocess.run([make, "-s", "gpu-check", f"PY={sys.executable}"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert out.returncode != 0
    assert "gpu-check: no NVIDIA GPU: nvidia-smi is not on PATH" in out.stderr
