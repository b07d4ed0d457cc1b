"""What fixed gates cost: a multi-head run's routed adapter against its plain LoRA exports (`rlora export`), per task,
on the run's held-out split with the run's own scoring (`evaluate.evaluate_plan`, as `rlora eval` scores).

    python benchmarks/fixed_gates.py runs/demo --uniform EXPORT_DIR --per-task EXPORTS_DIR [--max-per-task N]

Columns: the routed run; the uniform-gate export; for each task, the export made with that task's own mean gates
(EXPORTS_DIR/<task>/, from `rlora export --gates per-task`), scored on that task. `--max-per-task` scores only the
first N held-out examples of each task (the same ones in every column), for a busy machine; the default is the run's
whole evaluation set (`data.max_eval_per_task`), which is what `rlora eval RUN_DIR --adapter DIR` scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--uniform", required=True, help="the uniform-gate export's folder")
    parser.add_argument("--per-task", required=True, help="the folder of the per-task exports (one folder a task)")
    parser.add_argument("--max-per-task", type=int, help="held-out examples scored per task (default: the run's)")
    parser.add_argument("--cache-dir")
    args = parser.parse_args(argv)

    from rlora.adapters import load_adapter
    from rlora.evaluate import TaskResult, _average, evaluate_plan
    from rlora.reports import results_table
    from rlora.run import Run

    run = Run.open(args.run_dir, args.cache_dir).load()
    plan = run.plan
    if args.max_per_task:
        plan = dataclasses.replace(plan, test={t: ex[: args.max_per_task] for t, ex in plan.test.items()})

    def score(model) -> dict:
        return evaluate_plan(model.eval(), run.tokenizer, run.cfg, plan)

    columns = {"routed": score(run.model)}
    plain = Run.open(args.run_dir, args.cache_dir, adapter=False).base_model
    exports = {"uniform": Path(args.uniform)} | {t: Path(args.per_task) / t for t in plan.test}
    model = None
    for name, folder in exports.items():
        model = load_adapter(model or plain, folder, adapter_name=name)
    model.set_adapter("uniform")
    columns["uniform gates"] = score(model)
    own = {}
    for task in plan.test:
        model.set_adapter(task)
        one = dataclasses.replace(plan, test={task: plan.test[task]})
        own[task] = TaskResult(**evaluate_plan(model.eval(), run.tokenizer, run.cfg, one)["tasks"][task])
    columns["task's own gates"] = {"tasks": {t: dataclasses.asdict(r) for t, r in own.items()}}
    columns["task's own gates"]["average"] = _average(own.values())
    n = args.max_per_task or run.cfg.data.max_eval_per_task
    print(f"run {args.run_dir} (method {run.cfg.method}, seed {run.cfg.seed}), held-out split, first {n} per task")
    print(results_table(columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
