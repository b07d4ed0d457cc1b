"""`rlora serve`'s parts: the request checks (protocol.py), the served runs (runs.py), the generation worker that
batches every request step by step (engine.py) and the async HTTP front end (app.py). See docs/serving.md."""
