"""Every claim of support in the README and docs/ names tests that exist (`scripts/claims.py`), and the check itself
finds a phrase a document no longer says and a test that is gone."""

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("claims", ROOT / "scripts" / "claims.py")
claims = sys.modules["claims"] = importlib.util.module_from_spec(_spec)  # a dataclass needs its module registered
_spec.loader.exec_module(claims)


def test_every_claim_is_in_its_document_and_names_tests_that_exist():
    assert claims.problems() == []


def test_a_phrase_no_longer_in_its_document_and_a_missing_test_are_named(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "def test_real():\n    pass\n\nclass TestGroup:\n    def test_m(self):\n        pass\n"
    )
    (tmp_path / "README.md").write_text("It works\non a CPU.\n")
    table = [
        claims.Claim(
            "README.md", "It works on a CPU", ("tests/test_x.py::test_real", "tests/test_x.py::TestGroup::test_m")
        ),
        claims.Claim("README.md", "It flies", ("tests/test_x.py::test_gone", "tests/test_y.py::test_real")),
        claims.Claim("docs/none.md", "anything", ()),
    ]
    assert claims.problems(table, [], tmp_path) == [
        "README.md: no longer says 'It flies': re-point the claim in scripts/claims.py",
        "docs/none.md: no such document",
        "tests/test_x.py::test_gone: no such test (backing README.md: 'It flies')",
        "tests/test_y.py::test_real: no such test (backing README.md: 'It flies')",
        "docs/none.md: 'anything' names no test",
    ]


def test_the_table_lists_every_claim_and_the_unbacked_ones_with_what_they_should_say(capsys):
    assert claims.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + len(claims.CLAIMS) + len(claims.UNBACKED)
    assert all("none: " in line and "should say" in line for line in lines[len(lines) - len(claims.UNBACKED) :])
    # three cells a row: a phrase quoting a table row ("`rlora demo` | ...") has its `|` escaped
    assert [len(re.findall(r"(?<!\\)\|", line)) for line in lines] == [4] * len(lines)
    assert any("\\|" in line for line in lines)
