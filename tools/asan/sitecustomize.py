"""make test-asan puts this folder on PYTHONPATH: every Python process of the
run (pytest and the subprocesses tests start) imports memboost from the
sources with the sanitizer build of the native library named by
$MEMBOOST_NATIVE_BUILD (see tools/native_import.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from native_import import use_native_build  # noqa: E402

use_native_build(os.environ["MEMBOOST_NATIVE_BUILD"])
