"""Integrations with other libraries, loaded only when those libraries are.

Hugging Face transformers (memboost.integrations.transformers): MemboostConfig
and MemboostHfQuantizer, registered under quant_method "memboost" through
transformers' public `register_quantization_config` / `register_quantizer`.

Importing transformers' quantizer registry costs about 2 s, more than
memboost's own import, so `import memboost` does not import it. Instead
`watch_transformers()` (called by memboost/__init__) registers at once when
`transformers.quantizers.auto` is already imported, and otherwise puts a small
finder first on sys.meta_path that, when transformers imports that module
(every `from_pretrained` does, through modeling_utils), runs the module as
usual and then registers. The finder removes itself once it has fired.
`memboost.integrations.transformers.register()` does the same explicitly.
"""

import importlib.abc
import sys
import warnings

_TRANSFORMERS_TRIGGER = "transformers.quantizers.auto"


def _register_transformers() -> None:
    module = sys.modules.get(__name__ + ".transformers")
    if module is not None and not hasattr(module, "register"):
        return  # it is being imported (and importing transformers): it registers itself when done
    from . import transformers as hf_integration

    hf_integration.register()


class _RegisterAfterExec(importlib.abc.Loader):
    """Runs the wrapped loader, then registers memboost with the module it loaded."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        try:
            _register_transformers()
        except Exception as exc:  # transformers must keep working even if our registration cannot
            warnings.warn(f"memboost could not register its transformers quantizer: {exc!r}; "
                          "call memboost.integrations.transformers.register() to see why", stacklevel=2)

    def __getattr__(self, name):  # resource readers, get_source, ... of the real loader
        return getattr(self._loader, name)


class _TransformersFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of transformers.quantizers.auto."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRANSFORMERS_TRIGGER:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # fires once
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfterExec(spec.loader)
                return spec
        return None


def watch_transformers() -> None:
    """Registers memboost with transformers now if its quantizer registry is
    loaded, else as soon as it is (see the module docstring)."""
    if _TRANSFORMERS_TRIGGER in sys.modules:
        try:
            _register_transformers()
        except Exception as exc:
            warnings.warn(f"memboost could not register its transformers quantizer: {exc!r}", stacklevel=2)
        return
    if not any(isinstance(f, _TransformersFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TransformersFinder())
