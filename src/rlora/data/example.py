"""The one example schema and the one place that renders an example into the text the model sees.

Two formulations of a multiple-choice example (`Example.format`):

- "rc" (cloze, as OLMES and lm-eval-harness ask small models): each choice is a (context, continuation)
  pair, by default ("<prompt>\nAnswer:", "<choice text>"); built-in tasks give their own, in the style OLMES
  uses for them (e.g. WinoGrande: the sentence up to the blank with each option filled in, then the rest of
  the sentence as the continuation). The target is the gold pair's continuation; each choice is scored by the
  log-likelihood of its continuation.
- "mc" (the R-LoRA paper's style): the prompt lists the options and ends in an answer format, the target is
  a short label:

    multiple choice, lettered     multiple choice, word labels      free-form
    ------------------------      ----------------------------      ---------
    <prompt>                      <prompt>                          <prompt>
    A. <choice 0>                 Answer format: yes/no. Answer:    Answer:
    B. <choice 1>
    Answer format: A/B. Answer:

The MC target is the label of the gold choice ("A", "yes"), the free-form target the answer. In plain mode the
model sees the context, then " " + continuation + EOS; with a chat template the prompt is the user turn and the
target the assistant turn (see `tokenize.py`).

A conversation (instruction data: Alpaca, chat `messages`, ShareGPT) is a free-form example whose `turns` hold
everything before the final reply (an optional system turn, then user and assistant turns alternating, ending
with a user turn); `answer` is the final assistant reply and `prompt` the last user turn. Every assistant turn is
trained; the final reply is what evaluation scores and generates. With a chat template the turns are the chat's
messages; in plain mode they are written as

    System: <system>

    User: <user turn>

    Assistant: <assistant turn>

    User: <last user turn>

    Assistant: <answer>
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass

from ..errors import DataError

LETTERS = string.ascii_uppercase
FORMATS = ("rc", "mc")
MIN_CHOICES = 2
DEFAULT_FORMAT = "rc"  # a run's formulation of multiple choice unless it says otherwise (`data.format`)
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One task example.

    For multiple choice, `choices` holds the option texts, `gold` indexes the right one, `labels` holds
    what the model answers for each option (letters by default; the option texts themselves for tasks
    such as yes/no whose options are single words, which are then not listed in the prompt) and
    `answer == labels[gold]`. Free-form examples leave `choices`, `labels` and `gold` as None.

    `cloze` holds the RC rendering, one (context, continuation) pair per choice (None: the default
    ("<prompt>\nAnswer:", choice)). `format` says which formulation to use ("rc" or "mc"; None: the run's
    default, resolved when a run's tasks load (`store.TaskData`), "mc" where there is no run: `formulation`).
    Neither enters the train/test split's hash.

    `turns` makes a free-form example a conversation: (role, content) pairs before the final reply (see the
    module docstring); they enter the split's hash.
    """

    task: str
    prompt: str  # the question text, without the answer-format scaffolding
    answer: str
    choices: tuple[str, ...] | None = None
    gold: int | None = None
    uid: str = ""
    labels: tuple[str, ...] | None = None
    cloze: tuple[tuple[str, str], ...] | None = None
    format: str | None = None
    turns: tuple[tuple[str, str], ...] | None = None

    @property
    def formulation(self) -> str:
        """How the example is asked and scored: "free" (free-form), else its `format`, "mc" if it names none."""
        if not self.is_multiple_choice:
            return "free"
        return self.format or "mc"

    def __post_init__(self) -> None:
        if self.turns is not None:
            problem = conversation_problem(self.turns, self.prompt)
            if problem is not None or self.choices is not None:
                raise DataError(f"{self.uid}: {problem or 'a conversation has no choices'}")
        if format_problem(self.format) is not None:
            raise DataError(f"{self.uid}: format {self.format!r} is not one of {', '.join(FORMATS)}")
        if (self.choices is None) != (self.gold is None) or (
            self.choices is None and (self.labels is not None or self.cloze is not None)
        ):
            raise DataError(f"{self.uid}: choices and gold (and labels, cloze) go together")
        if self.choices is None:
            return
        if len(self.choices) < MIN_CHOICES:
            raise DataError(f"{self.uid}: a multiple-choice example needs at least {MIN_CHOICES} choices")
        if gold_problem(self.gold, len(self.choices)) is not None:
            raise DataError(f"{self.uid}: gold {self.gold} is not an index into {len(self.choices)} choices")
        problem = labelling_problem(len(self.choices), self.labels)
        if problem is not None:
            raise DataError(f"{self.uid}: {problem}")
        labels = self.labels if self.labels is not None else tuple(LETTERS[: len(self.choices)])
        if self.cloze is not None and (
            len(self.cloze) != len(self.choices) or not all(len(pair) == 2 for pair in self.cloze)
        ):
            raise DataError(f"{self.uid}: cloze must hold one (context, continuation) pair per choice")
        if labels_problem(labels, len(self.choices)) is not None:
            raise DataError(f"{self.uid}: labels {labels} must be distinct, one per choice")
        if self.answer != labels[self.gold]:
            raise DataError(f"{self.uid}: answer {self.answer!r} is not the gold label {labels[self.gold]!r}")
        object.__setattr__(self, "labels", labels)

    @classmethod
    def multiple_choice(
        cls,
        task: str,
        prompt: str,
        choices: tuple[str, ...] | list[str],
        gold: int,
        uid: str,
        labels: tuple[str, ...] | list[str] | None = None,
        cloze: tuple[tuple[str, str], ...] | list | None = None,
        format: str | None = None,
    ) -> Example:
        """A multiple-choice example whose answer is the gold label (a letter unless `labels` is given)."""
        choices = tuple(choices)
        problem = labelling_problem(len(choices), labels)
        if problem is not None:
            raise DataError(f"{uid}: {problem}")
        labels = tuple(labels) if labels is not None else tuple(LETTERS[: len(choices)])
        answer = labels[gold] if 0 <= gold < len(labels) else ""
        cloze = tuple(tuple(pair) for pair in cloze) if cloze is not None else None
        return cls(task, prompt, answer, choices, gold, uid, labels, cloze, format)

    @property
    def is_multiple_choice(self) -> bool:
        return self.choices is not None


def conversation_problem(turns: tuple[tuple[str, str], ...], prompt: str) -> str | None:
    """None if `turns` are a conversation before a final reply, else what is wrong."""
    if not turns or not all(isinstance(t, tuple) and len(t) == 2 for t in turns):
        return "turns must be a non-empty sequence of (role, content) pairs"
    roles = [role for role, _ in turns]
    unknown = next((r for r in roles if r not in ROLES), None)
    if unknown is not None:
        return f"turn role {unknown!r} is not one of {', '.join(ROLES)}"
    body = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(body))]
    if body != expected or not body:
        return "after an optional system turn, user and assistant turns must alternate, starting and ending with user"
    if turns[-1][1] != prompt:
        return "prompt must be the last user turn"
    return None


def format_problem(fmt: object) -> str | None:
    """None if `fmt` names a formulation (or is None: the run's default), else what is expected."""
    return None if fmt is None or fmt in FORMATS else f"one of {', '.join(map(repr, FORMATS))}"


def gold_problem(gold: object, n_choices: int) -> str | None:
    """None if `gold` is an index into `n_choices` choices, else what is expected."""
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < n_choices:
        return f"an integer index into 'choices' (0..{n_choices - 1})"
    return None


def labels_problem(labels: tuple[str, ...] | list[str], n_choices: int) -> str | None:
    """None if `labels` are distinct, one per choice, else what is expected."""
    if len(labels) != n_choices or len(set(labels)) != len(labels):
        return f"{n_choices} distinct labels, one per choice"
    return None


def labelling_problem(n_choices: int, labels: tuple[str, ...] | list[str] | None) -> str | None:
    """None if `n_choices` choices can be labelled (by `labels`, or by letters when None), else what is wrong."""
    if labels is None and n_choices > len(LETTERS):
        return f"{n_choices} choices but only {len(LETTERS)} letters to label them; give labels, one per choice"
    return None


def choice_labels(example: Example) -> tuple[str, ...]:
    """What the model may answer for each choice, in choice order (empty for free-form examples)."""
    return example.labels or ()


def with_default_format(example: Example, fmt: str) -> Example:
    """The example in formulation `fmt`, unless it names its own (free-form examples have none)."""
    if not example.is_multiple_choice or example.format is not None:
        return example
    return dataclasses.replace(example, format=fmt)


def render_pairs(example: Example) -> list[tuple[str, str]]:
    """What the model reads and what it answers, per choice: (context, continuation) pairs, the continuation
    following the context after one space (plain mode) or as the assistant turn (chat template).

    Free-form examples have one pair, (prompt, answer); a conversation's context is its turns in plain mode's
    rendering (with a chat template, `tokenize.py` renders `turns` itself)."""
    if example.turns is not None:
        return [(render_turns(example.turns), example.answer)]
    if not example.is_multiple_choice:
        return [(render_prompt(example), example.answer)]
    if example.formulation == "rc":
        return list(example.cloze or ((f"{example.prompt}\nAnswer:", c) for c in example.choices))
    prompt = render_prompt(example)
    return [(prompt, label) for label in example.labels]


def gold_pair(example: Example) -> tuple[str, str]:
    """The (context, continuation) the model is trained on: the gold choice's (or the free-form answer)."""
    pairs = render_pairs(example)
    return pairs[example.gold] if example.is_multiple_choice else pairs[0]


def render_prompt(example: Example) -> str:
    """The MC / free-form prompt: the text the model sees before its label or answer (the user turn with a
    chat template). RC examples are rendered by `render_pairs`."""
    if not example.is_multiple_choice:
        return f"{example.prompt}\nAnswer:"
    lines = [example.prompt]
    if example.labels != example.choices:
        lines += [f"{label}. {text}" for label, text in zip(example.labels, example.choices, strict=True)]
    lines.append(f"Answer format: {'/'.join(example.labels)}. Answer:")
    return "\n".join(lines)


def render_turns(turns: tuple[tuple[str, str], ...]) -> str:
    """Plain mode's rendering of a conversation before a reply, ending in "Assistant:" (see the module docstring)."""
    return "".join(text for text, _ in turn_pieces(turns))


def turn_pieces(turns: tuple[tuple[str, str], ...]) -> list[tuple[str, bool]]:
    """The plain rendering as (text, trained) pieces: "System: ...\n\n", "User: ...\n\nAssistant:", then an
    assistant turn's " reply" (trained) and its "\n\n" (not trained). Each piece is tokenized on its own, so the
    trained tokens are exactly the replies' tokens."""
    out: list[tuple[str, bool]] = []
    for role, content in turns:
        if role == "assistant":
            out += [(f" {content}", True), ("\n\n", False)]
        else:
            out.append((f"{role.capitalize()}: {content}\n\n" + ("Assistant:" if role == "user" else ""), False))
    return out
