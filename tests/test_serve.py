"""`rlora serve`: a real server process on 127.0.0.1 with two runs of a tiny model, spoken to over HTTP (httpx): the
greedy text of `rlora generate` for each run, streaming, concurrent requests that never mix runs, OpenAI's errors, and
a clean stop on SIGTERM. Every request loop is bounded in count and time."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from _tiny import TINY_CHAT_TEMPLATE, perturb_adapter, untrained_runs, write_config

from rlora.commands.generate import Sampling, generate_run
from rlora.serving.runs import load_served
from rlora.errors import ConfigError

RUNS = ("alpha", "beta")
PROMPTS = ("Question: is the sky blue?", "Answer format: A/B. Answer:")
MAX_TOKENS = 6
TIMEOUT = 60  # seconds, for any one request (the tiny model answers in well under a second)


def make_runs(workspace: Path, root: Path) -> dict[str, Path]:
    """Two finished R-LoRA runs of one tiny model (with a chat template), made without training, their adapters
    moved apart from their init by different amounts and seeds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlora.run import RunFolder
    from rlora.runconfig import load_run_config
    from rlora.train import build_peft_model

    shutil.copytree(workspace, root / "ws", ignore=shutil.ignore_patterns("runs*"))
    tokenizer = AutoTokenizer.from_pretrained(root / "ws" / "model")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(root / "ws" / "model")
    made = {}
    for seed, name in enumerate(RUNS):
        out = root / name
        cfg = load_run_config(write_config(root / "ws", out), [f"seed={seed}"])
        RunFolder(out).write_config(cfg)
        model = build_peft_model(cfg, AutoModelForCausalLM.from_pretrained(root / "ws" / "model"))
        perturb_adapter(model, seed=seed + 1, scale=1.0)
        model.save_pretrained(RunFolder(out).adapter)
        made[name] = out
    return made


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(workspace, tmp_path_factory) -> dict[str, Path]:
    return make_runs(workspace, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def expected(runs) -> dict[tuple[str, str, bool], str]:
    """`rlora generate`'s greedy text for each (run, prompt, chat template)."""
    texts = {}
    for name, run in runs.items():
        for chat in (False, True):
            results = generate_run(
                run, PROMPTS, sampling=Sampling(max_new_tokens=MAX_TOKENS), chat_template=chat, stream=False
            )
            texts |= {(name, r["prompt"], chat): r["text"] for r in results}
    return texts


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "rlora", "serve", *map(str, runs.values()), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT)
    deadline = time.monotonic() + 300  # loading torch, transformers and the runs on 2 busy cores: well under that
    while process.poll() is None and time.monotonic() < deadline:  # polled every 0.25 s: at most 1200 times
        try:
            if client.get("/v1/models").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.25)
    else:
        process.kill()
        pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
    yield {"process": process, "client": client, "log": log, "port": port}
    client.close()
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)


def complete(client: httpx.Client, model: str, prompt: str, **extra) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0} | extra
    return client.post("/v1/completions", json=body)


def test_models_lists_the_runs(server):
    answer = server["client"].get("/v1/models").json()
    assert answer["object"] == "list" and [m["id"] for m in answer["data"]] == list(RUNS)


def test_completions_give_the_greedy_text_of_rlora_generate(server, expected):
    for name in RUNS:
        for prompt in PROMPTS:
            answer = complete(server["client"], name, prompt).json()
            (choice,) = answer["choices"]
            assert choice["text"] == expected[(name, prompt, False)]
            assert answer["model"] == name and answer["object"] == "text_completion"
            assert choice["finish_reason"] in ("stop", "length") and answer["usage"]["completion_tokens"] >= 1
    assert expected[("alpha", PROMPTS[0], False)] != expected[("beta", PROMPTS[0], False)]  # the runs differ


def test_chat_completions_use_the_chat_template(server, expected):
    body = {"model": "beta", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": MAX_TOKENS}
    answer = server["client"].post("/v1/chat/completions", json=body | {"temperature": 0}).json()
    (choice,) = answer["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected[("beta", PROMPTS[1], True)]}
    assert answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")


def events(response: httpx.Response) -> list:
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_streaming_sends_the_same_text_in_pieces(server, expected):
    client = server["client"]
    body = {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        chunks = events(response)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected[("alpha", PROMPTS[0], False)]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "usage" in chunks[-1]
    chat = {"model": "beta", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": MAX_TOKENS}
    with client.stream("POST", "/v1/chat/completions", json=chat | {"temperature": 0, "stream": True}) as response:
        chunks = events(response)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == expected[("beta", PROMPTS[1], True)]


def test_concurrent_requests_for_both_runs_are_never_mixed(server, expected):
    port = server["port"]
    jobs = [(RUNS[i % 2], PROMPTS[i // 2 % 2]) for i in range(8)]

    def ask(job):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as client:
            return complete(client, *job).json()["choices"][0]["text"]

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(ask, jobs, timeout=4 * TIMEOUT))
    assert texts == [expected[(name, prompt, False)] for name, prompt in jobs]


@pytest.mark.parametrize(
    ("request_args", "status", "message"),
    [
        ({"json": {"model": "gamma", "prompt": "hi"}}, 404, "The model 'gamma' does not exist; served: alpha, beta"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "The body is not valid JSON"),
        ({"json": {"prompt": "hi"}}, 400, "model: Field required"),
        ({"json": {"model": "alpha", "prompt": "hi", "max_tokens": 0}}, 400, "max_tokens: Input should be greater"),
        ({"json": {"model": "alpha", "prompt": "hi", "n": 2}}, 400, "n: Input should be less than or equal to 1"),
        (
            {"json": {"model": "alpha", "prompt": " ".join(["yes"] * 80)}},
            400,
            "This model's maximum context length is 64 tokens; the request has a prompt of 80 tokens.",
        ),
        (
            {"json": {"model": "alpha", "prompt": " ".join(["yes"] * 60), "max_tokens": 10}},
            400,
            "maximum context length is 64 tokens; the request has a prompt of 60 tokens and 10 tokens to generate",
        ),
    ],
)
def test_bad_requests_get_openai_errors(server, request_args, status, message):
    response = server["client"].post("/v1/completions", **request_args)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_an_unknown_path_is_a_json_404(server):
    response = server["client"].get("/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["message"] == "Not Found"


def test_runs_that_cannot_share_a_server_are_refused_before_loading(runs, workspace, tmp_path):
    with pytest.raises(ConfigError, match="two runs are named 'alpha': every served run folder needs its own name"):
        load_served([runs["alpha"], runs["alpha"]])
    plain = untrained_runs(workspace, tmp_path)
    with pytest.raises(ConfigError, match="a lora run cannot be served with the rlora run"):
        load_served([plain["rlora"], plain["lora"]])


def test_sigterm_stops_the_server_cleanly(server):
    process = server["process"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    log = server["log"].read_text()
    assert "Traceback" not in log and "serving alpha, beta on http://127.0.0.1:" in log and "stopped" in log
