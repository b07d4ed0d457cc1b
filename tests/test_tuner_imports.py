"""The method's package `rlora.tuner` stands alone: it imports nothing from rlora's data, training or command line,
and its own modules import each other without a circle (the PEFT type is a leaf)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import rlora.tuner

TUNER = Path(rlora.tuner.__file__).parent
# everything of rlora that the method needs: the package's own modules, rlora's errors, and `import rlora` itself
ALONE = [
    "rlora",
    "rlora._peft_hook",
    "rlora.errors",
    "rlora.tuner",
    "rlora.tuner.config",
    "rlora.tuner.layer",
    "rlora.tuner.model",
    "rlora.tuner.peft_type",
]


def test_importing_the_tuner_alone_loads_only_the_tuner_and_registers_it():
    script = (
        "import json, sys\nimport rlora.tuner\n"
        "from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING\nfrom peft.utils import PeftType\n"
        "registered = PEFT_TYPE_TO_TUNER_MAPPING[PeftType('RLORA')] is rlora.tuner.RLoraModel\n"
        "print(json.dumps([registered, sorted(m for m in sys.modules if m == 'rlora' or m.startswith('rlora.'))]))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    registered, loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert registered
    assert loaded == ALONE


def _rlora_imports(module: Path) -> set[str]:
    """The rlora modules that `module` (a file of rlora.tuner) imports, as dotted names, read from its source."""
    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:  # relative: .x is rlora.tuner.x, ..x is rlora.x
            base = ["rlora", "tuner"][: 3 - node.level] + ([node.module] if node.module else [])
            found |= {".".join(base)} if node.module else {".".join([*base, a.name]) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "rlora":
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "rlora"}
    return found


def test_the_tuner_modules_import_each_other_without_a_circle():
    graph = {f"rlora.tuner.{p.stem}": _rlora_imports(p) for p in TUNER.glob("*.py") if p.stem != "__init__"}
    assert graph == {
        "rlora.tuner.peft_type": set(),
        "rlora.tuner.config": {"rlora.errors", "rlora.tuner.peft_type"},
        "rlora.tuner.layer": {"rlora.tuner.config"},
        "rlora.tuner.model": {"rlora.errors", "rlora.tuner.config", "rlora.tuner.layer"},
        "rlora.tuner.convert": {"rlora.tuner.layer"},  # fixed-gate LoRA and the merge, beside the tuner as in PEFT
    }


def test_the_data_package_imports_nothing_above_it():
    """`rlora.data` decides a run's data from its `data` settings and seed: it reads no run config, run or command."""
    data = Path(rlora.tuner.__file__).parent.parent / "data"
    outside = set()
    for module in data.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2:  # ..x is rlora.x
                outside.add(f"rlora.{node.module}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlora.") and node.level == 0:
                outside.add(node.module)
    # rlora.names: the one rule for names that become paths (a leaf: it imports rlora.errors alone)
    assert outside == {"rlora._io", "rlora.config_fields", "rlora.errors", "rlora.models", "rlora.names"}
