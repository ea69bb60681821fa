"""Imports memboost from its source folder with a chosen native library.

The editable install (scikit-build-core) imports memboost through a finder
of its own, which atheris cannot instrument for coverage and which always
loads the library of the last `pip install -e .`. use_native_build() puts
the source folder first on sys.path, drops that finder and maps
memboost._C / memboost._build_info to the files in `build_dir` (a CMake
build tree, e.g. build/asan/ext), by default $MEMBOOST_NATIVE_BUILD or the
installed ones.
Call it before memboost is imported.
"""

import glob
import importlib.abc
import importlib.util
import os
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _NativeFinder(importlib.abc.MetaPathFinder):
    def __init__(self, files):
        self.files = files

    def find_spec(self, name, path=None, target=None):
        if name in self.files:
            return importlib.util.spec_from_file_location(name, self.files[name])
        return None


def use_native_build(build_dir=None) -> None:
    if build_dir is None:  # the sanitizer build under make test-asan, else the installed one
        build_dir = os.environ.get("MEMBOOST_NATIVE_BUILD") or os.path.join(sysconfig.get_paths()["purelib"],
                                                                             "memboost")
    libs = glob.glob(os.path.join(build_dir, "_C*.so"))
    info = os.path.join(build_dir, "_build_info.py")
    if len(libs) != 1 or not os.path.isfile(info):
        raise ImportError(f"{build_dir!r} holds no single built memboost._C and _build_info.py")
    sys.meta_path[:] = [f for f in sys.meta_path if "ScikitBuild" not in type(f).__name__]
    sys.meta_path.insert(0, _NativeFinder({"memboost._C": libs[0], "memboost._build_info": info}))
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
