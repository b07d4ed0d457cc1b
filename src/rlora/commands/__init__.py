"""What each `rlora` verb does, one module per verb, each with `run(args)` (the parsed arguments of `cli.py`; it
returns the exit code). The library functions a verb is built on (`evaluate_run`, `compare`, `generate_run`, ...)
live in its module too; `cli.py` only parses, and maps errors to exit codes."""
