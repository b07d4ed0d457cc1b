"""The README and docs/ stay true to the code: the run-config reference is the generated one and names every key,
every relative link points at a file that exists, and every `rlora <verb>` shown is a verb that answers --help."""

import contextlib
import dataclasses
import io
import re
import typing
from pathlib import Path

import pytest

import rlora.commands.lm_eval
from rlora.cli import build_parser, main
from rlora.config_reference import config_reference
from rlora.runconfig import RunConfig

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCED = re.compile(r"```(\w*)\n(.*?)```", re.DOTALL)  # (language, code)
SHELL = ("", "bash", "sh", "console")
INLINE = re.compile(r"`([^`\n]+)`")
VERB = re.compile(r"(?:^|[\s|&;(])rlora ([a-z][a-z-]*)")


def _keys(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def test_the_config_reference_is_the_generated_one_and_names_every_key():
    committed = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert committed == config_reference(), "docs/config.md is stale: run python scripts/gen_config_doc.py"
    missing = [key for key in _keys(RunConfig) if f"| `{key}` |" not in committed]
    assert missing == []
    assert "| `data.tasks` |" in committed and "| `base.quantization` |" in committed  # nested sections included


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_points_at_a_file(page):
    text = page.read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    missing = [t for t in targets if t and not (page.parent / t).exists()]
    assert missing == []


def _verbs_shown() -> dict[str, list[str]]:
    shown: dict[str, list[str]] = {}
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        code = [c for lang, c in FENCED.findall(text) if lang in SHELL] + INLINE.findall(FENCED.sub("", text))
        for verb in {v for snippet in code for v in VERB.findall(snippet)}:
            shown.setdefault(verb, []).append(page.name)
    return shown


def _verb_parsers(parser) -> dict:
    """The verbs' own parsers, by name."""
    return parser._subparsers._group_actions[0].choices


def test_every_verb_shown_answers_help(monkeypatch):
    shown = _verbs_shown()
    assert {"demo", "train", "eval", "export", "serve"} <= set(shown)  # the pages are read at all
    parser = build_parser()
    verbs = _verb_parsers(parser)
    unknown = {verb: pages for verb, pages in shown.items() if verb not in verbs}
    assert unknown == {}
    for verb in sorted(set(shown) - {"lm-eval"}):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            parser.parse_args([verb, "--help"])
        assert exit_.value.code == 0 and f"rlora {verb}" in out.getvalue()
    # `rlora lm-eval` hands every argument, --help included, to lm-eval-harness's own command line
    passed = []
    monkeypatch.setattr(rlora.commands.lm_eval, "run", lambda args: passed.append(args.lm_eval_args) or 0)
    assert main(["lm-eval", "--help"]) == 0 and passed == [["--help"]]


def test_no_help_text_shows_an_unconsumed_percent_escape():
    """argparse formats a `help=` string with %, so "95%%" there prints "95%"; a `description=` is printed as written
    (it is %-formatted only when it names %(prog)s), so "%%" there would print as "%%"."""
    parser = build_parser()
    verbs = _verb_parsers(parser)
    texts = {"rlora": parser.format_help()} | {verb: sub.format_help() for verb, sub in verbs.items()}
    assert "95% CIs" in " ".join(texts["compare"].split())  # the wrapping follows the terminal's width
    assert {verb: text.count("%%") for verb, text in texts.items() if "%%" in text} == {}
