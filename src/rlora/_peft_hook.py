"""`import rlora` registers R-LoRA with PEFT without loading PEFT (and torch) itself.

`import rlora` must be enough for `PeftModel.from_pretrained`, `PeftConfig.from_pretrained` and `get_peft_model` to
know R-LoRA (lm-eval and users rely on it); yet the `rlora` command imports this package first and must start in
a fraction of a second, which PEFT and torch (seconds) do not allow. So `import rlora` registers at once only when
PEFT is loaded already. Otherwise it watches the imports of PEFT and of rlora's core modules, and registers after
whichever of them finishes last: registering needs PEFT, `RLoraConfig` and `RLoraModel` whole, so it waits while
any of them is half-imported (a core module imports PEFT at its top, for instance).

If a PEFT upgrade changed how registration works, `_registry.register` is the one place to change; the tests of
tests/test_peft_integration.py run every import order through it.
"""

from __future__ import annotations

import importlib.abc
import sys

WATCHED = frozenset({"peft", "rlora._registry", "rlora.config", "rlora.layer", "rlora.model"})
_importing: set[str] = set()


def install() -> None:
    """Registers now if PEFT is loaded, else as soon as it is (see the module docstring)."""
    if "peft" in sys.modules:
        _register_when_ready()
    elif not any(isinstance(finder, _Watcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Watcher())


def _register_when_ready() -> None:
    if _importing or "peft" not in sys.modules:
        return
    from ._registry import register

    register()
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _Watcher)]


class _Watcher(importlib.abc.MetaPathFinder):
    """Finds a watched module with the other finders and wraps its loader in `_ThenRegister`."""

    def find_spec(self, name, path=None, target=None):
        if name not in WATCHED:
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
    """Runs the module with its own loader, then registers if nothing watched is still half-imported."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__spec__.loader = module.__loader__ = self.loader  # the module keeps its own loader
        _importing.add(module.__name__)
        try:
            self.loader.exec_module(module)
        finally:
            _importing.discard(module.__name__)
        _register_when_ready()
