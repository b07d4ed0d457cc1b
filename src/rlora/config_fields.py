"""A run-config field: its default, its help text and its range, in the field's metadata, so that one generic check
(`runconfig.validate_run_config`) and the generated reference (`config_reference.py`) read the same facts. A leaf:
the run config's sections (`runconfig.py`, `data/settings.py`) declare their fields with it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import field
from typing import Any

Range = tuple[Callable[[Any], bool], str]  # (is the value in range?, what is expected)


def key(default: Any, help: str, valid: Range | None = None, factory: Callable[[], Any] | None = None) -> Any:
    """A run config field: its default, its help text and its range (checked by `validate_run_config`)."""
    metadata = {"help": help} | ({"range": valid} if valid is not None else {})
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def one_of(choices: Sequence[str]) -> Range:
    return (lambda v: v in choices, f"one of {', '.join(choices)}")


def at_least(low: int, null: bool = False) -> Range:
    return (lambda v: (null and v is None) or (v is not None and v >= low), f"an integer >= {low}{' or null' * null}")


POSITIVE = at_least(1)
FINITE_POSITIVE: Range = (lambda v: 0 < v < math.inf, "a finite number > 0")
UNIT_OPEN: Range = (lambda v: 0 < v < 1, "a number in (0, 1)")
