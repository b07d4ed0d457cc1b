"""`rlora generate`: text from a trained run, streamed to the terminal, and (with `routing`) which head each adapted
layer's router favours at every token, drawn as a map (PNG) or a coloured table (HTML)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError, ModelError
from ..run import Run

ROUTING_FORMATS = (".png", ".html")


@dataclasses.dataclass
class Sampling:
    """Greedy unless `do_sample`; then `temperature` and `top_p` as in transformers' `generate`."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def kwargs(self) -> dict:
        if not self.do_sample:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return dataclasses.asdict(self)


def check_routing_path(path: str | Path | None) -> None:
    if path is not None and Path(path).suffix.lower() not in ROUTING_FORMATS:
        raise ConfigError(f"--routing {path}: expected a file ending in {' or '.join(ROUTING_FORMATS)}")


def generate_run(
    run_dir: str | Path,
    prompts: Sequence[str],
    *,
    sampling: Sampling | None = None,
    chat_template: bool | None = None,
    routing: str | Path | None = None,
    cache_dir: str | None = None,
    stream: bool = True,
    adapter: str | Path | None = None,
) -> list[dict]:
    """Generates a continuation of each prompt with the run's adapter (`Run.open`, which checks it), printing it as
    it comes (transformers' `TextStreamer`) when `stream`. `chat_template`: wrap each prompt in the tokenizer's chat
    template (None: as the run was trained). With `routing` (.png or .html), also draws which head every adapted
    layer favours at every token of prompt and continuation (`analysis.favoured_heads`); only for a multi-head run.
    With `adapter`, another adapter folder (an export: the fixed-gate model) on the run's base replaces the run's.

    Returns per prompt {"prompt", "text" (the continuation), "ids" (prompt and continuation), "prompt_tokens"} and,
    with `routing`, "tokens", "layers", "heads" ((tokens, layers) tensor) and "num_heads"."""
    import torch
    from transformers import TextStreamer

    from ..analysis import favoured_heads
    from ..data.tokenize import encode_context
    from ..tuner.layer import reuse_fused_weights

    if not prompts:
        raise ConfigError("no prompt: give prompts as arguments, or one per line on stdin")
    empty = [i + 1 for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ConfigError(f"prompt {empty[0]} is empty; give the text to continue")
    check_routing_path(routing)
    if routing is not None and adapter is not None:
        raise ConfigError("--routing: draws a multi-head run's router; an --adapter export has none")
    run = Run.open(run_dir, cache_dir, adapter=adapter is None)
    if routing is not None:
        run.require_multi_head("--routing needs a multi-head run")
    sampling = sampling or Sampling()
    if adapter is not None:
        from ..adapters import load_adapter

        run.load()
        model = load_adapter(run.base_model, adapter)
    else:
        model = run.load().model
    tokenizer = run.tokenizer
    use_chat = run.cfg.data.chat_template if chat_template is None else chat_template
    if use_chat and not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"model {run.cfg.model!r}: its tokenizer has no chat template; leave out --chat-template")
    model.eval()
    device = next(model.parameters()).device
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    pad = tokenizer.pad_token_id  # `models.load_tokenizer` gives every tokenizer one
    encoded = [encode_context(tokenizer, prompt, use_chat) for prompt in prompts]
    check_context(run.context_length, encoded, sampling.max_new_tokens)
    outputs = []
    for prompt, ids in zip(prompts, encoded, strict=True):
        if stream:
            print(f"=== {prompt}", flush=True)
        with torch.no_grad(), reuse_fused_weights(model):
            out = model.generate(
                input_ids=torch.tensor([ids], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                pad_token_id=pad,
                streamer=streamer,
                **sampling.kwargs(),
            )[0].tolist()
        new = out[len(ids) :]
        result = {"prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=True), "ids": out}
        result["prompt_tokens"] = len(ids)
        if routing is not None:
            result |= favoured_heads(model, out)
            result["tokens"] = [tokenizer.decode([i]) for i in out]
        outputs.append(result)
    if routing is not None:
        write_routing(outputs, routing)
    return outputs


def check_context(context: int | None, encoded: Sequence[list[int]], max_new_tokens: int) -> None:
    """Refuses, before generating anything, a prompt whose tokens and `max_new_tokens` would run past the model's
    context (`Run.context_length`; None: the model does not say): the model was never trained on positions past
    it."""
    if context is None:
        return
    for i, ids in enumerate(encoded):
        if len(ids) + max_new_tokens > context:
            raise ConfigError(
                f"prompt {i + 1}: its {len(ids)} tokens and --max-new-tokens {max_new_tokens} exceed the model's "
                f"context of {context} tokens; shorten the prompt or lower --max-new-tokens"
            )


def write_routing(maps: list[dict], path: str | Path) -> None:
    from .._io import atomic_write_text
    from ..plots import plot_routing
    from ..reports import routing_html

    num_heads = maps[0]["num_heads"]
    if Path(path).suffix.lower() == ".html":
        atomic_write_text(path, routing_html(maps, num_heads))
    else:
        plot_routing(maps, num_heads, path)


def run(args: argparse.Namespace) -> int:
    check_routing_path(args.routing)
    prompts = args.prompts or [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
    sampling = Sampling(args.max_new_tokens, args.do_sample, args.temperature, args.top_p)
    generate_run(
        args.run_dir,
        prompts,
        sampling=sampling,
        chat_template=args.chat_template,
        routing=args.routing,
        cache_dir=args.cache_dir,
        adapter=args.adapter,
    )
    if args.routing:
        print(f"routing map written to {args.routing}")
    return 0
