"""Each benchmark runs end to end in its --quick configuration and prints the table it promises (no timings checked)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def table_rows(table: str) -> list[list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if not line.startswith("|---")]


def test_layer_benchmark_prints_one_row_per_shape_and_token_count_with_every_variant():
    import bench_layer

    rows = table_rows(bench_layer.main(["--quick", "--tokens", "8"]))
    header, body = rows[0], rows[1:]
    for variant in ("base", "HydraLoRA (fused)", "R-LoRA (fused)", "per-head loop"):
        assert f"{variant} time" in header and f"{variant} mem" in header
    assert len(body) == len(bench_layer.QUICK_SHAPES)
    assert all(len(row) == len(header) for row in body)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_train_step_benchmark_compares_the_three_methods_and_the_two_paddings():
    import bench_train_step

    rows = table_rows(bench_train_step.main(["--quick"]))
    header, body = rows[0], rows[1:]
    assert header[:3] == ["variant", "batch (rows×padded len)", "step ms"]
    assert [row[0] for row in body[:3]] == bench_train_step.METHODS
    assert body[3][0].startswith("R-LoRA, pad dynamic") and body[4][0].startswith("R-LoRA, pad fixed")
    assert body[0][4] == "1.00" and body[3][4] == "1.00"
    assert all(len(row) == len(header) for row in body)


def test_startup_benchmark_times_help_and_tasks_against_a_bare_python():
    import bench_startup

    rows = table_rows(bench_startup.main(["--quick"]))
    header, body = rows[0], rows[1:]
    assert header[:2] == ["command", "median s"]
    assert [row[0] for row in body] == ["python -c pass", "rlora --help", "rlora tasks"]
    assert all(float(row[1]) > 0 for row in body)
