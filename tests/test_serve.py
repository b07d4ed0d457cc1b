"""`rlora serve`: real server processes on 127.0.0.1 with runs of tiny models, spoken to over HTTP (httpx).

The main server (two runs of the tiny model, an API key from the environment) answers the correctness tests: the
greedy text of `rlora generate` for each run and of the base model, streaming, concurrent requests that never mix
runs, stop/seed/logprobs/echo, every field refused by name, client errors as 400s, and a soak of a few hundred mixed
requests. A second server on a long-context tiny model with a batch of 2 and a queue of 2 answers the tests of
cancellation and of the queue bound, counted in decoding steps (its /health). Every request loop is bounded in count
and time; timings are only compared as ratios of two requests to the same server."""

import json
import os
import random
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
import torch
from _tiny import TINY_CHAT_TEMPLATE, TINY_SHAPE, byte_tokenizer, perturb_adapter, untrained_runs, write_config

from rlora.commands.generate import Sampling, generate_run
from rlora.errors import ConfigError
from rlora.serving.engine import Delta, Done, Engine, Job, Row, choose
from rlora.serving.runs import load_served

RUNS = ("alpha", "beta")
BASE_ID = "model"  # the base model's id: its folder's name
PROMPTS = ("Question: is the sky blue?", "Answer format: A/B. Answer:")
MAX_TOKENS = 6
TIMEOUT = 60  # seconds, for any one request (the tiny model answers in well under a second)
KEY = "test-key"
# The tiny template, refusing a conversation that opens with the assistant (as real templates refuse bad orders).
CHAT_TEMPLATE = (
    "{% if messages[0].role == 'assistant' %}{{ raise_exception('Conversations start with a user message') }}"
    "{% endif %}" + TINY_CHAT_TEMPLATE
)
SURROGATE = "<a lone surrogate>"  # replaced by one in the JSON text sent (httpx cannot encode one)
LONG_CONTEXT = 4096  # the slow server's model: long generations, so that a dropped one is seen in its step count


def make_runs(workspace: Path, root: Path, context: int | None = None) -> dict[str, Path]:
    """Two finished R-LoRA runs of one tiny model (with a chat template), made without training, their adapters
    moved apart from their init by different amounts and seeds; with `context`, the model reads that many tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rlora.run import RunFolder
    from rlora.runconfig import load_run_config
    from rlora.train import build_peft_model

    shutil.copytree(workspace, root / "ws", ignore=shutil.ignore_patterns("runs*"))
    if context is not None:  # the same tiny shape with a longer position limit
        tokenizer = byte_tokenizer()
        ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
        torch.manual_seed(0)
        shape = TINY_SHAPE | {"max_position_embeddings": context, "vocab_size": len(tokenizer)}
        model = LlamaForCausalLM(LlamaConfig(**shape, **ids))
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(root / "ws" / "model")
        tokenizer.save_pretrained(root / "ws" / "model")
    tokenizer = AutoTokenizer.from_pretrained(root / "ws" / "model")
    tokenizer.chat_template = CHAT_TEMPLATE
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


def start_server(runs, log: Path, *flags: str, env: dict | None = None) -> dict:
    port = free_port()
    env = os.environ | {"OMP_NUM_THREADS": "1"} | (env or {})
    command = [sys.executable, "-m", "rlora", "serve", *map(str, runs), "--port", str(port), *flags]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    headers = {"Authorization": f"Bearer {env['RLORA_API_KEY']}"} if "RLORA_API_KEY" in env else {}
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT, headers=headers)
    deadline = time.monotonic() + 300  # loading torch, transformers and the runs on 2 busy cores: well under that
    while process.poll() is None and time.monotonic() < deadline:  # polled every 0.25 s: at most 1200 times
        try:
            if client.get("/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    else:
        process.kill()
        pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
    return {"process": process, "client": client, "log": log, "port": port, "headers": headers}


def stop_server(server: dict) -> None:
    server["client"].close()
    if server["process"].poll() is None:
        server["process"].kill()
        server["process"].wait(timeout=30)


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
def served(runs):
    """The runs loaded in this process as the server loads them, for the naive references."""
    return load_served(list(runs.values()))


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    started = start_server(runs.values(), log, env={"RLORA_API_KEY": KEY})
    yield started
    stop_server(started)


@pytest.fixture(scope="module")
def slow_server(workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_slow")
    slow_runs = make_runs(workspace, root, context=LONG_CONTEXT)
    started = start_server([slow_runs["alpha"]], root / "server.log", "--max-batch", "2", "--max-queue", "2")
    yield started
    stop_server(started)


def complete(client: httpx.Client, model: str, prompt: str, **extra) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0} | extra
    return client.post("/v1/completions", json=body)


def text_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def events(response: httpx.Response) -> list:
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


# ---- what is served ------------------------------------------------------------------------------------------------


def test_models_lists_the_runs_and_the_base_model(server):
    client = server["client"]
    answer = client.get("/v1/models").json()
    assert answer["object"] == "list" and [m["id"] for m in answer["data"]] == [*RUNS, BASE_ID]
    assert client.get("/v1/models/beta").json()["id"] == "beta"
    missing = client.get("/v1/models/gamma")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["queued"] == 0


def test_completions_give_the_greedy_text_of_rlora_generate(server, expected):
    for name in RUNS:
        for prompt in PROMPTS:
            answer = complete(server["client"], name, prompt).json()
            (choice,) = answer["choices"]
            assert choice["text"] == expected[(name, prompt, False)]
            assert answer["model"] == name and answer["object"] == "text_completion"
            assert choice["finish_reason"] in ("stop", "length") and answer["usage"]["completion_tokens"] >= 1
    assert expected[("alpha", PROMPTS[0], False)] != expected[("beta", PROMPTS[0], False)]  # the runs differ


def test_the_base_model_is_served_under_its_id(server, served):
    """Its greedy text is the base model's alone (the adapters disabled), by HF generate in this process."""
    tokenizer = served.tokenizer
    ids = tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad(), served.model.disable_adapter():
        out = served.model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0
        )
    want = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert text_of(complete(server["client"], BASE_ID, PROMPTS[0])) == want
    assert want != text_of(complete(server["client"], "alpha", PROMPTS[0]))


def test_chat_completions_use_the_chat_template(server, expected):
    body = {"model": "beta", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": MAX_TOKENS}
    answer = server["client"].post("/v1/chat/completions", json=body | {"temperature": 0}).json()
    (choice,) = answer["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected[("beta", PROMPTS[1], True)]}
    assert answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")


def test_streaming_sends_the_same_text_in_pieces(server, expected):
    client = server["client"]
    body = {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        chunks = events(response)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected[("alpha", PROMPTS[0], False)]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "usage" in chunks[-1]
    chat = {"model": "beta", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": MAX_TOKENS}
    options = {"temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=chat | options) as response:
        chunks = events(response)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == expected[("beta", PROMPTS[1], True)]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1  # include_usage's chunk


def test_the_official_openai_client_gets_the_texts_streams_usage_and_errors(server, expected):
    """As a user would talk to it: the `openai` package's client (no retries, the test's timeout)."""
    import openai

    base_url = f"http://127.0.0.1:{server['port']}/v1"
    client = openai.OpenAI(base_url=base_url, api_key=KEY, timeout=TIMEOUT, max_retries=0)
    assert [m.id for m in client.models.list()] == [*RUNS, BASE_ID]
    answer = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert answer.choices[0].text == expected[("alpha", PROMPTS[0], False)]
    assert answer.usage.completion_tokens >= 1 and answer.usage.prompt_tokens >= 1
    messages = [{"role": "user", "content": PROMPTS[1]}]
    chat = client.chat.completions.create(model="beta", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    assert chat.choices[0].message.content == expected[("beta", PROMPTS[1], True)]
    stream = client.chat.completions.create(
        model="beta", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=2, best_of=2)
    assert "best_of: not supported by this server" in refused.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gamma", prompt=PROMPTS[0], max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url, api_key="wrong", timeout=TIMEOUT, max_retries=0).models.list()


def test_concurrent_requests_for_both_runs_and_the_base_are_never_mixed(server, expected):
    port, headers = server["port"], server["headers"]
    jobs = [(RUNS[i % 2], PROMPTS[i // 2 % 2]) for i in range(8)]
    base = text_of(complete(server["client"], BASE_ID, PROMPTS[1]))

    def ask(job):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT, headers=headers) as client:
            return text_of(complete(client, *job))

    with ThreadPoolExecutor(9) as pool:
        texts = list(pool.map(ask, [*jobs, (BASE_ID, PROMPTS[1])], timeout=4 * TIMEOUT))
    assert texts == [expected[(name, prompt, False)] for name, prompt in jobs] + [base]


# ---- fields --------------------------------------------------------------------------------------------------------


def test_stop_cuts_the_text_before_the_stop_string(server):
    client = server["client"]
    full = text_of(complete(client, "alpha", PROMPTS[0], max_tokens=12))
    stop = full[3:5]  # a string inside the greedy text: the text ends just before its first occurrence
    cut = full[: full.index(stop)]
    answer = complete(client, "alpha", PROMPTS[0], max_tokens=12, stop=[stop, "never there"]).json()
    assert answer["choices"][0]["text"] == cut and answer["choices"][0]["finish_reason"] == "stop"
    body = {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "stop": stop, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        chunks = events(response)
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_seed_gives_the_same_sampled_text_alone_or_in_a_batch(server):
    client, port, headers = server["client"], server["port"], server["headers"]
    sampled = {"temperature": 1.0, "max_tokens": 12}
    first = text_of(complete(client, "alpha", PROMPTS[0], seed=7, **sampled))
    assert text_of(complete(client, "alpha", PROMPTS[0], seed=7, **sampled)) == first
    others = {text_of(complete(client, "alpha", PROMPTS[0], seed=s, **sampled)) for s in (8, 9, 10)}
    assert len(others | {first}) > 1  # other seeds draw other texts

    def ask(args):
        model, seed = args
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT, headers=headers) as c:
            return text_of(complete(c, model, PROMPTS[0], seed=seed, **sampled))

    with ThreadPoolExecutor(4) as pool:  # the seeded request decoded beside others
        texts = list(pool.map(ask, [("beta", 1), ("alpha", 7), (BASE_ID, 2), ("alpha", 3)], timeout=4 * TIMEOUT))
    assert texts[1] == first


def naive_greedy(served, model_id: str, ids: list[int], steps: int, top: int):
    """Greedy ids with each one's log-probability and the `top` best (id, log-probability), by a full forward of the
    whole sequence at every step (no cache, one row)."""
    chosen, logprobs, tops = [], [], []
    for _ in range(steps):
        with torch.no_grad():
            logits = served.model(input_ids=torch.tensor([ids + chosen]), adapter_names=[model_id]).logits[0, -1]
        lp = logits.double().log_softmax(-1)
        token = int(lp.argmax())
        chosen.append(token)
        logprobs.append(float(lp[token]))
        values, best = lp.topk(top)
        tops.append(dict(zip(best.tolist(), values.tolist(), strict=True)))
    return chosen, logprobs, tops


@pytest.mark.numerics
def test_logprobs_are_the_models_own(server, served):
    """Against a naive full forward per token: float32 logits of a 2-layer model agree to ~1e-6 across batch shapes
    and caches, so 1e-4 on log-probabilities of size ~5 bounds rounding, not a wrong token or position."""
    tokenizer = served.tokenizer
    ids = tokenizer(PROMPTS[1])["input_ids"]
    chosen, logprobs, tops = naive_greedy(served, "beta", ids, MAX_TOKENS, 2)
    assert 1 not in chosen  # no end-of-sequence within MAX_TOKENS (the comparison below covers every token)
    answer = complete(server["client"], "beta", PROMPTS[1], logprobs=2).json()["choices"][0]
    got = answer["logprobs"]
    assert got["tokens"] == [tokenizer.decode([t]) for t in chosen]
    torch.testing.assert_close(got["token_logprobs"], logprobs, atol=1e-4, rtol=0)
    for given, want in zip(got["top_logprobs"], tops, strict=True):
        assert sorted(given) == sorted(tokenizer.decode([t]) for t in want)
        torch.testing.assert_close(sorted(given.values()), sorted(want.values()), atol=1e-4, rtol=0)
    assert got["text_offset"][0] == 0 and answer["text"] == tokenizer.decode(chosen)
    chat = {"model": "beta", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    content = server["client"].post("/v1/chat/completions", json=chat | {"logprobs": True, "top_logprobs": 1}).json()
    entries = content["choices"][0]["logprobs"]["content"]
    assert len(entries) <= 3 and all(len(e["top_logprobs"]) == 1 and e["logprob"] <= 0 for e in entries)
    assert entries[0]["top_logprobs"][0]["logprob"] >= entries[0]["logprob"]  # greedy picks the most likely


def test_echo_returns_the_prompt_before_the_completion(server, expected):
    client = server["client"]
    assert (
        text_of(complete(client, "alpha", PROMPTS[0], echo=True)) == PROMPTS[0] + expected[("alpha", PROMPTS[0], False)]
    )
    body = {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "echo": True}
    with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
        chunks = events(response)
    assert chunks[0]["choices"][0]["text"] == PROMPTS[0]


def test_top_k_is_added_only_when_asked():
    """transformers' generation_config carries top_k=50; here draws from nearly uniform logits over 300 tokens reach
    far more than 50 distinct tokens unless top_k is asked for (then exactly top_k tokens are possible)."""
    logits = torch.linspace(0, 1, 300)  # nearly uniform, no ties

    def distinct(top_k):
        row = Row(Job("a", [1], 400, print, temperature=1.0, top_k=top_k, seed=0), torch.device("cpu"))
        return len({choose(row.job, row.generator, logits) for _ in range(400)})

    assert distinct(None) > 200 and distinct(3) == 3


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": "gamma", "prompt": "hi"}, 404, "The model 'gamma' does not exist; served: alpha, beta, model"),
        ({"prompt": "hi"}, 400, "model: Field required"),
        ({"model": "alpha", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens: Input should be greater"),
        ({"model": "alpha", "prompt": "hi", "max_tokens": True}, 400, "max_tokens: Input should be a valid integer"),
        ({"model": "alpha", "prompt": "hi", "stream": "yes"}, 400, "stream: Input should be a valid boolean"),
        ({"model": "alpha", "prompt": "hi", "temperature": "1"}, 400, "temperature: Input should be a valid number"),
        ({"model": "alpha", "prompt": "hi", "stop": ["a", 1]}, 400, "stop: Input should be a valid string"),
        ({"model": "alpha", "prompt": "hi", "n": 2}, 400, "n: not supported by this server"),
        ({"model": "alpha", "prompt": "hi", "stop": list("abcde")}, 400, "stop: "),
        ({"model": "alpha", "prompt": "hi", "seed": 2**64}, 400, "seed: Input should be less than 1844674407"),
        ({"model": "alpha", "prompt": "hi", "best_of": 2}, 400, "best_of: not supported by this server"),
        ({"model": "alpha", "prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty: not supported"),
        ({"model": "alpha", "prompt": "hi", "frequency_penalty": 1}, 400, "frequency_penalty: not supported"),
        ({"model": "alpha", "prompt": "hi", "logit_bias": {"5": 1}}, 400, "logit_bias: not supported"),
        ({"model": "alpha", "prompt": "hi", "suffix": "x"}, 400, "suffix: not supported"),
        ({"model": "alpha", "prompt": "hi", "colour": "red"}, 400, "colour: unknown field"),
        ({"model": "alpha", "prompt": "hi", "logprobs": 6}, 400, "logprobs: Input should be less than or equal to 5"),
        ({"model": "alpha", "prompt": "hi", "logprobs": 1, "echo": True}, 400, "echo: not supported together"),
        ({"model": "alpha", "prompt": "hi", "stream_options": {}}, 400, "stream_options: only with stream: true"),
        ({"model": "alpha", "prompt": ""}, 400, "prompt: empty; give the text to continue"),
        ({"model": "alpha", "prompt": ["a", "b"]}, 400, "prompt: expected one prompt, got 2"),
        ({"model": "alpha", "prompt": [5, 100000]}, 400, "prompt: token id 100000 is outside the vocabulary"),
        ('{"model": "alpha", "prompt": "\\ud800 sky"}', 400, "prompt: invalid text at character 0 (a lone UTF-16"),
        (
            {"model": "alpha", "prompt": " ".join(["yes"] * 80)},
            400,
            "This model's maximum context length is 64 tokens; the request has a prompt of 80 tokens.",
        ),
        (
            {"model": "alpha", "prompt": " ".join(["yes"] * 60), "max_tokens": 10},
            400,
            "maximum context length is 64 tokens; the request has a prompt of 60 tokens and 10 tokens to generate",
        ),
    ],
)
def test_bad_completion_requests_get_openai_errors_naming_the_field(server, body, status, message):
    """A body given as a string is sent as it is (JSON that a JSON encoder would not write: a lone surrogate)."""
    raw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else None
    response = server["client"].post("/v1/completions", **(raw or {"json": body}))
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools: not supported by this server"),
        ({"response_format": {"type": "json_object"}}, "response_format: not supported by this server"),
        ({"tool_choice": "auto"}, "tool_choice: not supported"),
        ({"top_logprobs": 2}, "top_logprobs: only with logprobs: true"),
        ({"messages": []}, "messages: List should have at least 1 item"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role: Input should be"),
        ({"messages": [{"role": "user", "content": ""}]}, "messages: every message is empty"),
        ({"messages": [{"role": "user", "content": SURROGATE}]}, "messages.0.content: invalid text at character 0"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "the chat template refused them: Conversations start"),
        ({"messages": [{"role": "user", "content": "x"}] * 300}, "messages: 300 messages, over this server's limit"),
    ],
)
def test_bad_chat_requests_get_openai_errors_naming_the_field(server, extra, message):
    body = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "hi"}]} | extra)
    body = body.replace(json.dumps(SURROGATE), '"\\udfff"')  # a lone surrogate, as JSON may spell it
    headers = {"content-type": "application/json"}
    response = server["client"].post("/v1/chat/completions", content=body, headers=headers)
    assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_malformed_bodies_and_paths_are_json_errors(server):
    client = server["client"]
    headers = {"content-type": "application/json"}
    for raw in (b"{not json", b'{"model": NaN}', b"[1, 2]"):
        response = client.post("/v1/completions", content=raw, headers=headers)
        assert response.status_code == 400 and response.json()["error"]["message"].startswith("The body ")
    response = client.get("/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["message"] == "Not Found"
    assert "Traceback" not in server["log"].read_text()


def test_the_api_key_is_required_on_v1_but_not_on_health(server):
    base = f"http://127.0.0.1:{server['port']}"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(f"{base}/v1/models", headers=headers, timeout=TIMEOUT)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        response = httpx.post(f"{base}/v1/completions", json={"model": "alpha", "prompt": "a"}, headers=headers)
        assert response.status_code == 401
    assert httpx.get(f"{base}/health", timeout=TIMEOUT).status_code == 200


# ---- limits --------------------------------------------------------------------------------------------------------


def timed(call) -> tuple[float, httpx.Response]:
    start = time.perf_counter()
    response = call()
    return time.perf_counter() - start, response


def test_oversized_bodies_and_prompts_are_refused_before_tokenizing(server, served):
    """A 1.04 MB body (over --max-body-bytes) and a 900k-character prompt (over --max-prompt-chars, within the body
    limit) are refused in about the time of a small 1-token request: nothing was tokenized (tokenizing that prompt
    takes several times a small request, measured here too)."""
    client = server["client"]
    small = min(timed(lambda: complete(client, "alpha", "hi", max_tokens=1))[0] for _ in range(3))
    body_time, response = timed(lambda: complete(client, "alpha", "sky " * 260_000))
    assert response.status_code == 413 and "over this server's limit of 1000000 bytes" in response.text
    long_prompt = "the sky is blue " * 56_250  # 900,000 characters
    prompt_time, response = timed(lambda: complete(client, "alpha", long_prompt))
    assert (
        response.status_code == 400
        and "prompt: 900000 characters, over this server's limit of 200000" in (response.json()["error"]["message"])
    )
    start = time.perf_counter()
    served.tokenizer(long_prompt)
    tokenize = time.perf_counter() - start
    assert tokenize > 3 * small  # what refusing late would have cost at least
    assert prompt_time < tokenize and prompt_time < 3 * small + 0.1 * tokenize
    assert body_time < 3 * small + 0.1 * tokenize


def health(server) -> dict:
    return server["client"].get("/health").json()


def wait_idle(server, timeout: float = TIMEOUT) -> dict:
    """/health once nothing is running or queued (polled every 0.05 s, at most `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = health(server)
        if state["running"] == 0 and state["queued"] == 0:
            return state
        time.sleep(0.05)
    pytest.fail(f"the server stayed busy: {state}")


LONG = 3000  # tokens of a long generation on the slow server


def open_stream(server, read: int):
    """A streamed long generation with `read` events read; the caller closes it (and keeps the line iterator: once
    collected, it closes the response)."""
    client = httpx.Client(base_url=f"http://127.0.0.1:{server['port']}", timeout=TIMEOUT)
    body = {"model": "alpha", "prompt": "the sky", "max_tokens": LONG, "temperature": 0, "stream": True}
    context = client.stream("POST", "/v1/completions", json=body)
    response = context.__enter__()
    lines = response.iter_lines()
    for _ in range(read):
        next(line for line in lines if line)
    return client, context, lines


def test_a_dropped_stream_stops_its_row_within_a_few_steps(slow_server):
    """Closing a stream of 3000 tokens after 3 events: the worker runs a handful of steps more (the disconnect is
    seen between two steps, within the time the close takes to arrive), not the 3000, and the next request's latency
    is that of an idle server."""
    client = slow_server["client"]
    one = {"model": "alpha", "prompt": "sky", "max_tokens": 1, "temperature": 0}
    idle = min(timed(lambda: client.post("/v1/completions", json=one))[0] for _ in range(3))
    wait_idle(slow_server)
    stream_client, context, _lines = open_stream(slow_server, read=3)
    before = health(slow_server)
    assert before["running"] == 1
    context.__exit__(None, None, None)
    stream_client.close()
    after = wait_idle(slow_server)
    assert after["steps"] - before["steps"] < LONG // 20
    latency = timed(lambda: client.post("/v1/completions", json=one))[0]
    assert latency < 5 * idle
    # the same for a client that gives up on a non-streamed request (its read timeout closes the connection)
    start = health(slow_server)["steps"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"http://127.0.0.1:{slow_server['port']}/v1/completions",
            json=one | {"max_tokens": LONG},
            timeout=httpx.Timeout(TIMEOUT, read=0.5),
        )
    assert wait_idle(slow_server)["steps"] - start < LONG // 5


def test_the_queue_bound_answers_503_and_queued_requests_whose_client_left_never_start(slow_server):
    """Batch of 2, queue of 2: two long streams run, two more wait, the fifth request is refused at once with a 503
    and Retry-After; when the four clients leave, the two queued jobs are dropped unstarted."""
    wait_idle(slow_server)
    dropped = health(slow_server)["dropped"]
    streams = [open_stream(slow_server, read=2) for _ in range(2)]
    waiting = []
    for _ in range(2):  # their responses are not awaited: they sit in the queue
        c = httpx.Client(base_url=f"http://127.0.0.1:{slow_server['port']}", timeout=TIMEOUT)
        body = {"model": "alpha", "prompt": "sky", "max_tokens": LONG, "temperature": 0, "stream": True}
        context = c.stream("POST", "/v1/completions", json=body)
        waiting.append((c, context))
    pool = ThreadPoolExecutor(2)
    entered = [pool.submit(context.__enter__) for _, context in waiting]
    deadline = time.monotonic() + TIMEOUT
    while health(slow_server)["queued"] < 2 and time.monotonic() < deadline:  # polled every 0.05 s
        time.sleep(0.05)
    refused = slow_server["client"].post("/v1/completions", json={"model": "alpha", "prompt": "sky", "max_tokens": 1})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1", health(slow_server)
    assert refused.json()["error"]["code"] == "server_busy"
    state = health(slow_server)
    for (c, _), future in zip(waiting, entered, strict=True):  # the queued clients leave first
        future.result(timeout=TIMEOUT).close()  # a stream's headers come at once, before its job starts
        c.close()
    for c, context, _lines in streams:
        context.__exit__(None, None, None)
        c.close()
    pool.shutdown()
    after = wait_idle(slow_server)
    assert state["running"] == 2 and after["dropped"] - dropped == 2
    assert after["steps"] - state["steps"] < LONG // 10


# ---- the engine alone ----------------------------------------------------------------------------------------------


def run_jobs(engine: Engine, jobs: list[tuple[str, list[int], int]]) -> list[list]:
    """Every job's events, submitted at once to a started engine (waited for at most TIMEOUT seconds)."""
    events: list[list] = [[] for _ in jobs]
    for (adapter, ids, n), sink in zip(jobs, events, strict=True):
        engine.submit(Job(adapter, ids, n, sink.append, temperature=0))
    deadline = time.monotonic() + TIMEOUT
    while not all(e and isinstance(e[-1], Done) for e in events) and time.monotonic() < deadline:
        time.sleep(0.01)
    return events


def test_rows_that_join_and_leave_a_running_batch_get_the_text_they_get_alone(served):
    """Six jobs of different lengths over both runs and the base, three rows at a time: rows leave as they finish
    and queued ones join the running batch (its cache padded and extended). Each row's tokens are HF generate's for
    that row alone (end-of-sequence ignored on both sides, so that every row runs its full length)."""
    tokenizer, model = served.tokenizer, served.model
    prompts = [tokenizer(p)["input_ids"] for p in (*PROMPTS, "no", "yes B C D the sky")]
    jobs = [(["alpha", "beta", "__base__"][i % 3], prompts[i % 4], n) for i, n in enumerate((12, 5, 20, 9, 15, 7))]
    engine = Engine(model, tokenizer, max_batch=3)
    engine.eos = set()
    engine.start()
    try:
        events = run_jobs(engine, jobs)
    finally:
        engine.stop()
    for (adapter, ids, n), got in zip(jobs, events, strict=True):
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([ids]), adapter_names=[adapter], max_new_tokens=n, do_sample=False,
                pad_token_id=0, eos_token_id=None,
            )  # fmt: skip
        assert [t for e in got[:-1] for t in e.tokens] == out[0, len(ids) :].tolist()
        assert got[-1].reason == "length" and got[-1].completion_tokens == n


def test_a_job_past_its_deadline_ends_with_a_timeout(served):
    engine = Engine(served.model, served.tokenizer, max_batch=2)
    ended: list[Delta | Done] = []

    def emit(event):  # the running job's deadline passes once it has its first token
        ended.append(event)
        running.deadline = 0.0

    engine.start()
    try:
        late = Job("alpha", [5, 6, 7], 3, ended.append, temperature=0, deadline=time.monotonic() - 1)
        engine.submit(late)
        running = Job("alpha", [5, 6, 7], 40, emit, temperature=0)
        engine.submit(running)
        deadline = time.monotonic() + TIMEOUT
        while len([e for e in ended if isinstance(e, Done)]) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
    done = [e for e in ended if isinstance(e, Done)]
    assert done[0].status == 504 and done[0].message == "the request timed out in the queue"
    assert done[1].status == 504 and done[1].message == "the request timed out while generating"


# ---- the process ---------------------------------------------------------------------------------------------------


def rlora(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "rlora", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_a_bad_or_taken_port_is_one_line_before_loading(runs):
    run = str(runs["alpha"])
    bad = rlora("serve", run, "--port", "99999")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "rlora: error: --port 99999: expected a port number from 0 to 65535"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        busy = rlora("serve", run, "--port", str(port))
    assert busy.returncode == 2 and "Loading" not in busy.stderr and "serving" not in busy.stderr + busy.stdout
    assert (
        busy.stderr.strip()
        == f"rlora: error: --port {port}: cannot listen on 127.0.0.1:{port} (Address already in use)"
    )


def test_a_host_beyond_loopback_without_a_key_is_warned_about(runs):
    run = str(runs["alpha"])
    warned = rlora("serve", run, "--host", "0.0.0.0", "--port", "-1")  # the port error stops it before loading
    assert "--host 0.0.0.0 is reachable from other machines and no API key is set" in warned.stderr
    keyed = rlora("serve", run, "--host", "0.0.0.0", "--port", "-1", "--api-key", "k")
    assert "no API key" not in keyed.stderr and keyed.returncode == 2
    loopback = rlora("serve", run, "--port", "-1")
    assert "no API key" not in loopback.stderr


def test_runs_that_cannot_share_a_server_are_refused_before_loading(runs, workspace, tmp_path):
    with pytest.raises(ConfigError, match="two runs are named 'alpha': every served run folder needs its own name"):
        load_served([runs["alpha"], runs["alpha"]])
    plain = untrained_runs(workspace, tmp_path)
    with pytest.raises(ConfigError, match="a lora run cannot be served with the rlora run"):
        load_served([plain["rlora"], plain["lora"]])


def test_the_runs_base_section_loads_the_base_and_bases_that_differ_are_refused(runs, tmp_path):
    from rlora.run import RunFolder
    from rlora.runconfig import load_run_config

    eager = tmp_path / "eager"
    shutil.copytree(runs["beta"], eager)
    cfg = load_run_config(RunFolder(eager).config, ["base.attn_implementation=eager", f"output_dir={eager}"])
    RunFolder(eager).write_config(cfg)
    loaded = load_served([eager])
    assert loaded.model.config._attn_implementation == "eager"  # as the run's base section says
    with pytest.raises(
        ConfigError, match=r"eager: base.attn_implementation is 'eager', but .*alpha has None; the runs"
    ):
        load_served([runs["alpha"], eager])


# ---- holding up ----------------------------------------------------------------------------------------------------


def rss(process: subprocess.Popen) -> int:
    """The server's resident memory in kB (Linux)."""
    status = Path(f"/proc/{process.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])


def soak(server, requests: int, clients: int, seed: int) -> list[int | str]:
    """`requests` requests from `clients` threads: good ones (streamed or not, every served model), bad ones, and
    clients that leave mid-stream or time out; each answered (a status) or left on purpose ("left")."""
    port, headers = server["port"], server["headers"]
    rng = random.Random(seed)
    kinds = [rng.choice(["good", "good", "stream", "bad", "leave", "give_up"]) for _ in range(requests)]

    def one(i_kind):
        i, kind = i_kind
        model = [*RUNS, BASE_ID][i % 3]
        body = {"model": model, "prompt": PROMPTS[i % 2], "max_tokens": 8, "temperature": 0.7, "seed": i}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT, headers=headers) as c:
            if kind == "good":
                return c.post("/v1/completions", json=body).status_code
            if kind == "bad":
                return c.post("/v1/completions", json=body | {"max_tokens": "many"}).status_code
            if kind == "give_up":
                try:
                    return c.post("/v1/completions", json=body, timeout=httpx.Timeout(TIMEOUT, read=0.01)).status_code
                except httpx.ReadTimeout:
                    return "left"
            with c.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
                if kind == "leave":
                    next(response.iter_lines())
                    return "left"
                return response.status_code if events(response) else "empty"

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, enumerate(kinds), timeout=20 * TIMEOUT))


def test_a_soak_of_mixed_clients_is_answered_in_full_and_memory_returns(server):
    """300 requests from 6 clients after a warm-up round: every one answered with 200 or 400 (or left by its client
    on purpose), the server idle afterwards, and its memory within 10% of where it was after the warm-up."""
    soak(server, 60, 6, seed=0)
    wait_idle(server)
    start = rss(server["process"])
    results = soak(server, 300, 6, seed=1)
    assert set(results) <= {200, 400, "left"} and results.count(200) > 100 and results.count(400) > 20
    wait_idle(server)
    assert rss(server["process"]) < 1.1 * start
    assert "Traceback" not in server["log"].read_text()


def test_sigterm_stops_the_server_cleanly(server):
    process = server["process"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    log = server["log"].read_text()
    assert "Traceback" not in log and "serving alpha, beta, model on http://127.0.0.1:" in log and "stopped" in log
