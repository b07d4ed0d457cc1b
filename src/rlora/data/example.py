"""The one example schema and the one place that renders an example into the text the model sees.

Rendering (the R-LoRA paper's style: the prompt ends in an answer format, the target is a short label):

    multiple choice, lettered     multiple choice, word labels      free-form
    ------------------------      ----------------------------      ---------
    <prompt>                      <prompt>                          <prompt>
    A. <choice 0>                 Answer format: yes/no. Answer:    Answer:
    B. <choice 1>
    Answer format: A/B. Answer:

The target is the label of the gold choice ("A", "yes") or the free-form answer. In plain mode the
model sees the prompt, then " " + target + EOS; with a chat template the prompt is the user turn and the
target the assistant turn (see `tokenize.py`).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class Example:
    """One task example.

    For multiple choice, `choices` holds the option texts, `gold` indexes the right one, `labels` holds
    what the model answers for each option (letters by default; the option texts themselves for tasks
    such as yes/no whose options are single words, which are then not listed in the prompt) and
    `answer == labels[gold]`. Free-form examples leave `choices`, `labels` and `gold` as None.
    """

    task: str
    prompt: str  # the question text, without the answer-format scaffolding
    answer: str
    choices: tuple[str, ...] | None = None
    gold: int | None = None
    uid: str = ""
    labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if (self.choices is None) != (self.gold is None) or (self.choices is None and self.labels is not None):
            raise ValueError(f"{self.uid}: choices and gold (and labels) go together")
        if self.choices is None:
            return
        if len(self.choices) < 2:
            raise ValueError(f"{self.uid}: a multiple-choice example needs at least 2 choices")
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"{self.uid}: gold {self.gold} is not an index into {len(self.choices)} choices")
        labels = self.labels if self.labels is not None else tuple(LETTERS[: len(self.choices)])
        if len(labels) != len(self.choices) or len(set(labels)) != len(labels):
            raise ValueError(f"{self.uid}: labels {labels} must be distinct, one per choice")
        if self.answer != labels[self.gold]:
            raise ValueError(f"{self.uid}: answer {self.answer!r} is not the gold label {labels[self.gold]!r}")
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
    ) -> Example:
        """A multiple-choice example whose answer is the gold label (a letter unless `labels` is given)."""
        choices = tuple(choices)
        labels = tuple(labels) if labels is not None else tuple(LETTERS[: len(choices)])
        answer = labels[gold] if 0 <= gold < len(labels) else ""
        return cls(task, prompt, answer, choices, gold, uid, labels)

    @property
    def is_multiple_choice(self) -> bool:
        return self.choices is not None


def choice_labels(example: Example) -> tuple[str, ...]:
    """What the model may answer for each choice, in choice order (empty for free-form examples)."""
    return example.labels or ()


def render_prompt(example: Example) -> str:
    """The exact text the model sees before the answer (the user turn with a chat template)."""
    if not example.is_multiple_choice:
        return f"{example.prompt}\nAnswer:"
    lines = [example.prompt]
    if example.labels != example.choices:
        lines += [f"{label}. {text}" for label, text in zip(example.labels, example.choices, strict=True)]
    lines.append(f"Answer format: {'/'.join(example.labels)}. Answer:")
    return "\n".join(lines)
