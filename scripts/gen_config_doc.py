"""Writes docs/config.md, the run config's reference, from the fields of src/rlora/runconfig.py.

python scripts/gen_config_doc.py          # after changing a run-config field (tests/test_docs.py checks it)
"""

from pathlib import Path

from rlora._io import atomic_write_text
from rlora.config_reference import config_reference

if __name__ == "__main__":
    target = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    atomic_write_text(target, config_reference())
    print(f"wrote {target}")
