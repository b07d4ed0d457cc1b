"""Multi-task data: the example schema, built-in and JSONL tasks, splits, mixtures, tokenizing."""

from ..errors import DataError
from .example import (
    DEFAULT_FORMAT,
    FORMATS,
    Example,
    choice_labels,
    gold_pair,
    render_pairs,
    render_prompt,
    with_default_format,
)
from .mixture import format_mixture_table, mixture_counts, mixture_positions
from .registry import COMMONSENSE_8, SUITES, check_task_name, expand_task_names, list_tasks, load_task
from .split import DEFAULT_TEST_FRACTION
from .tokenize import (
    IGNORE_INDEX,
    CausalLMCollator,
    Spans,
    encode_context,
    encode_example,
    encode_examples,
    encode_prompt,
    encode_spans,
    example_spans,
    gold_spans,
    pad_ids,
    token_lengths,
    training_feature,
)

__all__ = [
    "COMMONSENSE_8",
    "DEFAULT_FORMAT",
    "DEFAULT_TEST_FRACTION",
    "FORMATS",
    "IGNORE_INDEX",
    "SUITES",
    "CausalLMCollator",
    "DataError",
    "Example",
    "Spans",
    "check_task_name",
    "choice_labels",
    "encode_context",
    "encode_example",
    "encode_examples",
    "encode_prompt",
    "encode_spans",
    "example_spans",
    "expand_task_names",
    "format_mixture_table",
    "gold_pair",
    "gold_spans",
    "list_tasks",
    "load_task",
    "mixture_counts",
    "mixture_positions",
    "pad_ids",
    "render_pairs",
    "render_prompt",
    "token_lengths",
    "training_feature",
    "with_default_format",
]
