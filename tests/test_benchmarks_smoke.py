"""Each benchmark runs end to end in its --quick configuration and prints the table it promises (no timings checked)."""

import json
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
    assert header[-2:] == ["R-LoRA / base time", "x read twice / base time"]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_answer_loss_benchmark_compares_the_head_at_the_answers_with_full_logits_and_peft_lora():
    import bench_answer_loss

    rows = table_rows(bench_answer_loss.main(["--quick", "--memory-repeats", "1"]))
    header, body = rows[0], rows[1:]
    assert header[:3] == ["variant", "step s", "time / R-LoRA full logits"]
    assert [row[0] for row in body] == bench_answer_loss.VARIANTS
    assert body[1][2] == "1.00" and body[1][4] == "1.00"


@pytest.mark.slow  # three fresh processes load the embedded model, one of them from a git worktree (minutes)
def test_eval_benchmark_scores_with_this_checkout_the_baseline_and_lm_eval():
    import bench_eval

    rows = table_rows(bench_eval.main(["--quick"]))
    header, body = rows[0], rows[1:]
    assert header[:3] == ["scorer", "scores s", "scores peak MiB"]
    assert [row[0].split()[0] for row in body] == ["lm-eval-harness", "rlora", "rlora"]
    assert all(row[5] == "4/4" for row in body)  # the same letter for every example


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


@pytest.mark.slow  # one training step of the embedded model in a fresh process (10–25 s on 2 cores)
def test_data_scale_benchmark_times_one_training_step_on_a_generated_mixture(tmp_path, model_cache_dir):
    import bench_data_scale

    out = tmp_path / "rows.json"
    args = ["--sizes", "2000", "--paths", "new", "--workdir", str(tmp_path / "work"), "--json", str(out)]
    args += ["--threads", "1", "--cache-dir", str(model_cache_dir)]  # one thread: steady on a busy machine
    rows = table_rows(bench_data_scale.main(args))
    header, body = rows[0], rows[1:]
    assert header[:5] == ["examples", "data MB", "path", "rev", "time to first step s"]
    assert "peak RSS GB" in header and "total s" in header
    assert [row[:3] for row in body] == [["2,000", body[0][1], "new"]]

    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert (row["size"], row["path"], row["repeats"], row["error"]) == (2000, "new", 1, None)
    assert 0 < row["first_step_s"] <= row["total_s"] and row["cpu_s"] > 0
    assert row["peak_rss_bytes"] > 10**8 and 0 < row["rss_at_first_step_bytes"] <= row["peak_rss_bytes"]
    assert row["runs"][0]["data_cache_bytes"] >= 0 and data["settings"]["data_cache"] == "cold"
    assert data["settings"]["imports"]["new"].startswith(str(Path(__file__).resolve().parents[1] / "src"))
    assert data["machine"]["cpus"] >= 1 and data["machine"]["torch"]

    (data_dir,) = (tmp_path / "work").glob("data-2000-*")
    counts = {f.stem: len(f.read_text().splitlines()) for f in data_dir.glob("*.jsonl")}
    assert counts == dict.fromkeys(bench_data_scale.TASKS, 500)
    lines = [json.loads(line) for f in data_dir.glob("*.jsonl") for line in f.read_text().splitlines()]
    assert sum("choices" in r for r in lines) == 500 and all(r["prompt"].strip() for r in lines)
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [data_dir.name]  # no run folder left behind
    before = {f: f.stat().st_mtime_ns for f in data_dir.glob("*.jsonl")}
    files, _ = bench_data_scale.mixture_files(tmp_path / "work", 2000, 0)  # reused, not written again
    assert {f: f.stat().st_mtime_ns for f in files} == before
    bench_data_scale.write_mixture(tmp_path / "again", 2000, 0)  # the same seed writes the same bytes
    assert all((tmp_path / "again" / f.name).read_bytes() == f.read_bytes() for f in files)


@pytest.mark.slow  # fresh processes build and map the tables of 2,000 examples twice, one from a git worktree
def test_data_cache_benchmark_times_warm_starts_against_a_baseline_and_the_full_check(tmp_path):
    import bench_data_cache

    out = tmp_path / "cache.json"
    table = bench_data_cache.main(["--quick", "--baselines", "HEAD", "--json", str(out)])
    rows = table_rows(table)
    assert rows[0] == ["path", "load_file s (median)", "process wall s (median)", f"load_file / {rows[2][0][6:]}"]
    assert rows[1][0].startswith("this checkout") and rows[2][0].startswith("rlora ") and rows[2][3] == "1.000"
    assert [row[0] for row in rows[4:]] == ["rlora cache (identities, as a run)", "rlora cache --verify (every byte)"]
    data = json.loads(out.read_text())
    assert data["size"] == 2000 and len(data["warm_starts"]["new"]) == 1
    assert {r[2] for runs in data["warm_starts"].values() for r in runs} == {2000}  # every path served them all


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_quantized_benchmark_has_every_base_method_and_checkpointing_with_ratios_to_float32():
    pytest.importorskip("bitsandbytes")
    import bench_quantized

    rows = table_rows(bench_quantized.main(["--quick"]))
    header, body = rows[0], rows[1:]
    assert header[:5] == ["base", "method", "checkpointing", "step ms", "time ratio"]
    expected = [[b, m, c] for b in bench_quantized.BASES for m in bench_quantized.METHODS for c in ("off", "on")]
    assert [row[:3] for row in body] == expected
    assert all(row[4] == "1.00" and row[6] == "1.00" for row in body if row[0] == "float32" and row[2] == "off")
    assert all(float(row[6]) < 1 for row in body if row[0] != "float32")  # quantized weights take less memory


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_gpu_check_smoke_version_trains_each_method_in_bf16_and_fp32_and_compares_them():
    import gpu_check

    text = gpu_check.main(["--cpu"])
    losses = table_rows(text.split("### Loss", 1)[1].split("###", 1)[0])
    header, body = losses[0], losses[1:]
    assert header[:3] == ["method", "fp32 loss @1", "bf16 loss @1"] and header[-1] == "within 2%"
    assert [row[0] for row in body] == list(gpu_check.METHODS.values())
    assert [row[-1] for row in body] == ["pass"] * 3 and body[0][-2] == "1.00"  # ratios to PEFT LoRA
    assert text.rstrip().endswith("Result: every method within 2% of fp32.")


def test_telemetry_benchmark_gives_telemetry_and_validation_as_ratios_of_the_training_step(workspace, tmp_path):
    import bench_telemetry
    from _tiny import write_config

    config = write_config(workspace, tmp_path / "run")
    rows = table_rows(bench_telemetry.main(["--quick", "--config", str(config), f"output_dir={tmp_path / 'run'}"]))
    header, body = rows[0], rows[1:]
    assert header == ["measured", "median s", "/ training step", "interval (steps)", "added per step"]
    assert [row[0].split()[0] for row in body] == ["training", "router", "validation"]
    assert body[0][2] == "1.00" and body[1][3] == "1" and body[2][3] == "32"  # write_config logs every step


def test_decode_benchmark_compares_r_lora_with_the_base_and_peft_lora_at_batch_1_and_8():
    import bench_decode

    rows = table_rows(bench_decode.main(["--quick"]))
    header, body = rows[0], rows[1:]
    assert header[: 1 + len(bench_decode.VARIANTS)] == ["batch", *bench_decode.VARIANTS]
    assert [row[0] for row in body] == ["1", "8"] and all(len(row) == len(header) for row in body)
