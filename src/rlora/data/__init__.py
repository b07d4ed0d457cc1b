"""Multi-task data: the example schema, built-in and JSONL tasks, splits, mixtures, tokenizing."""

from .errors import DataError
from .example import Example, choice_labels, render_prompt
from .jsonl import read_jsonl_tasks
from .mixture import build_mixture, format_mixture_table, mixture_counts
from .registry import COMMONSENSE_8, SUITES, check_task_name, expand_task_names, list_tasks, load_task
from .split import DEFAULT_TEST_FRACTION, split_examples
from .tokenize import (
    IGNORE_INDEX,
    CausalLMCollator,
    encode_answer,
    encode_example,
    encode_examples,
    encode_pair,
    encode_prompt,
    pad_ids,
)

__all__ = [
    "COMMONSENSE_8",
    "DEFAULT_TEST_FRACTION",
    "IGNORE_INDEX",
    "SUITES",
    "CausalLMCollator",
    "DataError",
    "Example",
    "build_mixture",
    "check_task_name",
    "choice_labels",
    "encode_answer",
    "encode_example",
    "encode_examples",
    "encode_pair",
    "encode_prompt",
    "expand_task_names",
    "format_mixture_table",
    "list_tasks",
    "load_task",
    "mixture_counts",
    "pad_ids",
    "read_jsonl_tasks",
    "render_prompt",
    "split_examples",
]
