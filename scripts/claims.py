"""Every claim of support in the README and docs/, with the tests that back it.

`CLAIMS` is the table: the document, a phrase of the claim as the document words it (matched with its whitespace
collapsed, so line breaks do not matter), and the tests (`tests/<file>.py::<test function>`, or
`::<Class>::<method>`) that would fail without what it claims. `UNBACKED` lists claims the documents make that no
test shows, each with why and what the claim should say instead; the list is meant to shrink. When a document is
rewritten, re-point the phrases here: the check names each one it no longer finds.

    python scripts/claims.py            # the table, as Markdown
    python scripts/claims.py --check    # exit 1 naming every phrase not found and every test that does not exist

`tests/test_claims.py` runs the check.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Claim:
    doc: str  # path from the repository's root
    says: str  # a phrase of the claim, as the document words it
    tests: tuple[str, ...]  # tests/<file>.py::<test> node ids, without parameters


def _t(file: str, *names: str) -> tuple[str, ...]:
    return tuple(f"tests/{file}.py::{name}" for name in names)


CLAIMS = [
    Claim(
        "README.md",
        "Every variant computes the pretrained function at step 0",
        _t(
            "test_layer",
            "test_zero_heads_start_exactly_at_the_base_layer",
            "test_random_heads_start_at_the_base_layer_up_to_rounding",
        )
        + _t("test_peft_integration", "test_get_peft_model_starts_at_the_base_model_without_editing_it"),
    ),
    Claim(
        "README.md",
        "`disable_adapter()` is the base model exactly, several adapters share one base, and a saved adapter reloads "
        "to the same function",
        _t(
            "test_peft_integration",
            "test_disable_adapter_gives_the_base_outputs_exactly",
            "test_several_adapters_are_added_switched_and_deleted",
            "test_a_saved_adapter_reloads_in_a_fresh_process_to_the_same_function",
        ),
    ),
    Claim(
        "README.md",
        "equal to a naive per-head loop (forward and gradients, 1e-5)",
        _t("test_layer", "test_fused_forward_and_gradients_equal_a_naive_per_head_loop"),
    ),
    Claim(
        "README.md",
        "fp32, bf16 and fp16; inputs of any leading shape",
        _t(
            "test_peft_integration",
            "test_low_precision_models_with_zero_heads_start_exactly_at_the_base",
            "test_low_precision_models_train",
        ),
    ),
    Claim(
        "README.md",
        "GPT-2 (and its family) | transformers' `Conv1D`",
        _t(
            "test_conv1d",
            "test_a_gpt2_model_starts_exactly_at_the_base_model",
            "test_the_fused_forward_of_a_conv1d_layer_and_its_gradients_equal_a_per_head_loop",
            "test_a_gpt2_adapter_reloads_in_a_fresh_process_to_the_same_function",
            "test_the_fixed_gate_merge_writes_the_transposed_update_into_a_conv1d_weight",
        ),
    ),
    Claim(
        "README.md",
        "QLoRA training + eval + resume through `rlora train`, fixed-gate merge against the float merge",
        _t(
            "test_quantized",
            "test_a_qlora_run_trains_evaluates_and_resumes_to_the_uninterrupted_adapter",
            "test_the_fixed_gate_merge_into_a_quantized_base_is_the_float_merge_up_to_requantization",
        ),
    ),
    Claim(
        "README.md",
        "The mixture draws the same examples for the same seed as the eager path did",
        _t("test_data_plan", "test_the_plan_draws_the_examples_the_eager_path_drew"),
    ),
    Claim(
        "README.md",
        "Nothing in the cache is trusted unchecked",
        _t("test_reliability", "test_a_damaged_table_is_read_again_with_a_warning_never_used")
        + _t(
            "test_data_cache_identity",
            "test_a_table_altered_in_place_with_its_size_and_mtime_restored_is_refused",
            "test_a_source_edited_in_place_with_its_size_and_mtime_restored_is_read_again",
            "test_a_warm_start_hashes_nothing_once_a_full_check_has_passed",
            "test_rlora_cache_verify_finds_a_flipped_byte_that_identity_cannot_see",
        ),
    ),
    Claim(
        "README.md",
        "a run killed at any moment resumes with `--resume` from its last complete checkpoint",
        _t(
            "test_resume",
            "test_resuming_from_a_checkpoint_in_any_epoch_trains_the_uninterrupted_adapter_bitwise",
            "test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_adapter_bitwise",
            "test_a_checkpoint_is_complete_before_the_one_before_it_is_removed",
        ),
    ),
    Claim(
        "README.md",
        "Under ZeRO-3 the base model's weights are partitioned over the processes as they load",
        _t("test_distributed", "test_zero3_over_two_processes_gathers_the_single_process_adapter_and_resumes"),
    ),
    Claim(
        "README.md",
        "under FSDP the Trainer shards the model with FSDP2's `fully_shard`, on CPU processes too",
        _t("test_distributed", "test_fsdp_over_two_cpu_processes_shards_resumes_and_gives_the_single_process_adapter"),
    ),
    Claim(
        "README.md",
        "first loads each of them with torch's weights-only loading",
        _t("test_distributed", "test_a_planted_deepspeed_checkpoint_file_is_refused_before_deepspeed_unpickles_it"),
    ),
    Claim(
        "README.md",
        "The export is exact for its gates",
        _t(
            "test_export",
            "test_the_exported_lora_is_the_fixed_gate_model_in_float64",
            "test_bare_peft_loads_the_export_in_a_fresh_process",
        ),
    ),
    Claim(
        "README.md",
        "gives every row its own adapter",
        _t(
            "test_mixed_batch",
            "test_a_mixed_batch_forward_equals_each_row_alone",
            "test_a_mixed_batch_generates_each_rows_own_greedy_text",
        ),
    ),
    Claim(
        "README.md",
        "so any OpenAI client works",
        _t(
            "test_serve",
            "test_completions_give_the_greedy_text_of_rlora_generate",
            "test_chat_completions_use_the_chat_template",
            "test_streaming_sends_the_same_text_in_pieces",
        ),
    ),
    Claim(
        "README.md",
        "checks the scorer against",
        _t("test_lm_eval_agreement", "test_rlora_eval_makes_lm_evals_choice_on_every_example"),
    ),
    Claim(
        "README.md",
        "`tests/test_lm_eval_cli.py` runs it on a tiny model and adapter",
        _t("test_lm_eval_cli", "test_rlora_lm_eval_evaluates_an_rlora_adapter"),
    ),
    Claim(
        "README.md",
        "imports nothing from data, training or the command line",
        _t("test_tuner_imports", "test_importing_the_tuner_alone_loads_only_the_tuner_and_registers_it"),
    ),
    Claim(
        "docs/data-cache.md",
        "a file only touched, copied or restored (new times or inode, same bytes) passes",
        _t("test_data_cache_identity", "test_a_touched_table_passes_the_full_check_and_its_new_identity_is_recorded"),
    ),
    Claim(
        "docs/data-cache.md",
        "The next run checks such a file in full again, then records it",
        _t("test_data_cache_identity", "test_files_changed_within_the_racy_window_are_not_trusted_by_identity"),
    ),
    Claim(
        "docs/data-cache.md",
        "A cache that the run cannot write (read-only) cannot record identities",
        _t("test_data_cache_identity", "test_a_cache_that_cannot_record_identities_is_checked_in_full_every_time"),
    ),
    Claim(
        "docs/benchmarks.md",
        "checks that `--help`, `tasks` and `show` load neither torch nor PEFT nor transformers",
        _t("test_cli", "test_help_and_the_data_commands_start_without_torch_peft_or_transformers"),
    ),
    Claim(
        "docs/benchmarks.md",
        "two-process (DDP, gloo) training",
        _t(
            "test_distributed", "test_two_process_data_parallel_training_gives_the_single_process_adapter_and_evaluates"
        ),
    ),
    Claim(
        "docs/benchmarks.md",
        "the largest tensor any aten operation produces",
        _t("test_output_head", "test_scoring_and_the_loss_never_make_a_batch_by_sequence_by_vocabulary_tensor"),
    ),
]

# Claims the documents make that no test here shows: (document, phrase, why, what it should say instead).
UNBACKED = [
    (
        "README.md",
        "`training.precision: bf16` runs on a CPU too",
        "no test trains a run in bf16 (and one fails today)",
        "nothing, until a test trains `training.precision: bf16` on a CPU",
    ),
    (
        "README.md",
        "LoRAX and llama.cpp's `convert_lora_to_gguf.py` accept by name",
        "the tests check PEFT's LoRA format, loading by bare PEFT and tensor names; no server or converter runs "
        "here (vLLM pins its own torch and wants a GPU, TGI and LoRAX are server images, llama.cpp's converter is "
        "not on the package index)",
        "an adapter in PEFT's LoRA format, which PEFT loads without rlora "
        "(`tests/test_export.py`), with the tensor names PEFT-format loaders (vLLM, TGI, LoRAX) read",
    ),
]


def _collapse(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def test_names(file: Path) -> set[str]:
    """The test functions of a test file: `name` at module level, `Class::name` in a class."""
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{f.name}" for f in node.body if isinstance(f, ast.FunctionDef)}
    return names


def problems(claims=CLAIMS, unbacked=UNBACKED, root: Path = REPO) -> list[str]:
    """Every phrase its document no longer says and every named test that does not exist; empty when all hold."""
    found, docs, tests = [], {}, {}
    phrases = [(c.doc, c.says) for c in claims] + [(doc, says) for doc, says, *_ in unbacked]
    for doc, says in phrases:
        if doc not in docs:
            path = root / doc
            docs[doc] = _collapse(path.read_text(encoding="utf-8")) if path.is_file() else None
        if docs[doc] is None:
            found.append(f"{doc}: no such document")
        elif _collapse(says) not in docs[doc]:
            found.append(f"{doc}: no longer says {says!r}: re-point the claim in scripts/claims.py")
    for claim in claims:
        if not claim.tests:
            found.append(f"{claim.doc}: {claim.says!r} names no test")
        for node in claim.tests:
            file, _, name = node.partition("::")
            if file not in tests:
                path = root / file
                tests[file] = test_names(path) if path.is_file() else set()
            if name not in tests[file]:
                found.append(f"{node}: no such test (backing {claim.doc}: {claim.says!r})")
    return found


def table() -> str:
    lines = ["| document | claim | tests |", "|---|---|---|"]
    lines += [f"| {c.doc} | {c.says} | {'<br>'.join(c.tests)} |" for c in CLAIMS]
    lines += [f"| {doc} | {says} | none: {why}; should say: {instead} |" for doc, says, why, instead in UNBACKED]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 naming what no longer holds")
    args = parser.parse_args(argv)
    if not args.check:
        print(table())
        return 0
    found = problems()
    for line in found:
        print(line, file=sys.stderr)
    print(f"{len(CLAIMS)} claims backed by tests, {len(UNBACKED)} without; {len(found)} problems")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
