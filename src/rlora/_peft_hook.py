"""`import rlora` registers R-LoRA with PEFT without loading PEFT (and torch) itself.

`import rlora` must be enough for `PeftModel.from_pretrained`, `PeftConfig.from_pretrained` and `get_peft_model` to
know R-LoRA (lm-eval and users rely on it); yet the `rlora` command imports this package first and must start in
a fraction of a second, which PEFT and torch (seconds) do not allow. Importing the method's package `rlora.tuner`
registers it; so `import rlora` imports that package at once only when PEFT is loaded already, and otherwise watches
the import of PEFT and imports it once PEFT is whole. A `rlora.tuner` that is itself importing PEFT (the first
thing it needs) is left to finish and register on its own.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

WATCHED = "peft"
TUNER = "rlora.tuner"


def install() -> None:
    """Registers now if PEFT is loaded, else as soon as it is (see the module docstring)."""
    if WATCHED in sys.modules:
        _register()
    elif not any(isinstance(finder, _Watcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Watcher())


def _register() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _Watcher)]
    if TUNER not in sys.modules:  # one being imported registers when it ends
        importlib.import_module(TUNER)


class _Watcher(importlib.abc.MetaPathFinder):
    """Finds PEFT with the other finders and wraps its loader in `_ThenRegister`."""

    def find_spec(self, name, path=None, target=None):
        if name != WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ThenRegister(spec.loader)
                return spec
        return None


class _ThenRegister(importlib.abc.Loader):
    """Runs PEFT's package with its own loader, then registers."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__spec__.loader = module.__loader__ = self.loader  # the module keeps its own loader
        self.loader.exec_module(module)
        _register()
