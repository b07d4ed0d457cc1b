import random

import pytest
from _reference import build_mixture

from rlora.data import Example, format_mixture_table, mixture_counts
from rlora.data.mixture import sample_range

SIZES = {"a": 100, "b": 400, "c": 25}


@pytest.mark.parametrize(
    ("strategy", "temperature", "total", "cap", "expected"),
    [
        ("proportional", 1.0, None, None, {"a": 100, "b": 400, "c": 25}),
        # 100 * (100, 400, 25) / 525 = 19.05, 76.19, 4.76: floors 19+76+4, the largest remainder (c) gets 1
        ("proportional", 1.0, 100, None, {"a": 19, "b": 76, "c": 5}),
        # shares from the capped sizes (50, 50, 25)
        ("proportional", 1.0, None, 50, {"a": 50, "b": 50, "c": 25}),
        ("equal", 1.0, None, None, {"a": 25, "b": 25, "c": 25}),
        # 33.3 each; c has 25, its 8.3 left go to a and b: 37.5 each, the tie goes to the first task
        ("equal", 1.0, 100, None, {"a": 38, "b": 37, "c": 25}),
        # T=2: weights sqrt(n) = 10, 20, 5; the largest mixture keeping 2:4:1 without exceeding c is 175
        ("temperature", 2.0, None, None, {"a": 50, "b": 100, "c": 25}),
        # 100 * (10, 20, 5) / 35 = 28.57, 57.14, 14.29: a has the largest remainder
        ("temperature", 2.0, 100, None, {"a": 29, "b": 57, "c": 14}),
        # 300 * 5/35 = 42.9 > 25: c gives 25, the 275 left split 1:2 = 91.7, 183.3
        ("temperature", 2.0, 300, None, {"a": 92, "b": 183, "c": 25}),
        ("temperature", 1.0, None, None, {"a": 100, "b": 400, "c": 25}),
    ],
)
def test_mixture_counts(strategy, temperature, total, cap, expected):
    counts = mixture_counts(SIZES, strategy, temperature, max_per_task=cap, total=total)
    assert counts == expected
    assert all(counts[t] <= SIZES[t] for t in SIZES)


def test_a_very_high_temperature_is_equal_shares():
    assert mixture_counts(SIZES, "temperature", 1e9, total=75) == {"a": 25, "b": 25, "c": 25}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "uniform"}, "unknown mixing strategy 'uniform'"),
        ({"strategy": "temperature", "temperature": 0.0}, "temperature must be > 0"),
        ({"total": 526}, "total=526 examples asked for, but the tasks offer 525"),
        ({"max_per_task": 0}, "max_per_task must be >= 1"),
    ],
)
def test_invalid_mixture_requests(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mixture_counts(SIZES, **kwargs)


def _tasks() -> dict[str, list[Example]]:
    return {t: [Example(t, f"{t} {i}", "x", uid=f"{t}/{i}") for i in range(n)] for t, n in (("p", 10), ("q", 4))}


def test_build_mixture_is_deterministic_shuffled_and_counted():
    first = build_mixture(_tasks(), "equal", seed=3)
    assert first == build_mixture(_tasks(), "equal", seed=3)
    assert first != build_mixture(_tasks(), "equal", seed=4)
    assert sorted(e.task for e in first) == ["p"] * 4 + ["q"] * 4
    assert len({e.uid for e in first}) == 8
    assert [e.task for e in first] != sorted(e.task for e in first)


def test_mixture_table():
    assert format_mixture_table({"a": 19, "bb": 81}, {"a": 100, "bb": 400}) == (
        "task   available  sampled   share\n"
        "a            100       19   19.0%\n"
        "bb           400       81   81.0%\n"
        "total        500      100  100.0%"
    )


@pytest.mark.parametrize(("n", "k"), [(0, 0), (1, 1), (5, 3), (40, 40), (1000, 999), (1000, 7), (100000, 30), (30, 6)])
def test_sample_range_draws_what_random_sample_draws(n, k):
    for seed in range(3):
        expected = random.Random(f"{seed}:t").sample(range(n), k)
        assert list(sample_range(random.Random(f"{seed}:t"), n, k)) == expected
