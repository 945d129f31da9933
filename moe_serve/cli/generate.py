"""`moe-serve generate`, `moe-serve info`, `moe-serve record-trace`.

    moe-serve generate [--model DIR] [--prompt TEXT ...|--prompts-file FILE] [--max-tokens N] ...
    moe-serve info DIR
    moe-serve record-trace --model DIR --prompts-file FILE --out trace.npz [--record-hidden]

Sampling flags carry SamplingParams' field names; engine flags derive from the config dataclasses.
`generate` prints each generation, the throughput, and each MoE layer's expert load.
"""
from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from moe_serve.cli.flags import add_config_flags, config_kwargs, output_file
from moe_serve.cli.info import format_info, model_info
from moe_serve.config import DEFAULT_MODEL, EngineConfig
from moe_serve.config_fields import same_file

DEFAULT_PROMPTS = ["Once upon a time", "The history of the city", "def fibonacci(n):"]
# every engine section but the HTTP server's
ENGINE_SECTIONS = tuple(cls for name, cls in EngineConfig.sections().items() if name != "server")


def _add_prompt_flags(p: argparse.ArgumentParser) -> None:
    demo = ", ".join(repr(d) for d in DEFAULT_PROMPTS)
    p.add_argument("--prompt", action="append", default=None,
                   help=f"a prompt (repeat for several); with neither this nor --prompts-file: {demo}")
    p.add_argument("--prompts-file", default=None,
                   help="a text file with one prompt per line, after any --prompt (default: none)")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (SamplingParams fields)")
    g.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate per prompt (default: 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1)")
    g.add_argument("--top-k", type=int, default=-1, help="keep the k most likely tokens; -1 = all (default: -1)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed of every request (default: none, unseeded)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeat for several)")
    g.add_argument("--stop-token-ids", type=int, nargs="+", action="extend", default=None,
                   help="token ids that end a request (repeat the flag to add more)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def _add_engine_flags(p: argparse.ArgumentParser, skip=()) -> None:
    # every sampling field is a flag here (seed included), so neither the engine's seed nor the
    # checkpoint's sampling defaults (generation_config) would ever apply
    for cls in ENGINE_SECTIONS:
        add_config_flags(p.add_argument_group(f"engine: {cls.__name__}"), cls,
                         skip=skip + ("seed", "generation_config"))


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from prompts; print tokens/s and expert load")
    _add_prompt_flags(p)
    _add_sampling_flags(p)
    _add_engine_flags(p)
    p.set_defaults(func=run_generate)

    p = subparsers.add_parser("info", help="describe a checkpoint: family, layers, experts, top-k, sizes")
    p.add_argument("model_dir", nargs="?", default=DEFAULT_MODEL,
                   help=f"checkpoint directory (default: the shipped default model, {DEFAULT_MODEL})")
    p.set_defaults(func=run_info)

    p = subparsers.add_parser("record-trace", help="run prompts and write their routing trace (.npz)")
    _add_prompt_flags(p)
    _add_sampling_flags(p)
    p.add_argument("--out", required=True, help="trace file to write (.npz)")
    _add_engine_flags(p, skip=("record_trace",))
    p.set_defaults(func=run_record_trace)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += _prompts_file(Path(args.prompts_file))
    return prompts or list(DEFAULT_PROMPTS)


def _prompts_file(path: Path) -> list[str]:
    """The file's non-blank lines. A file without any is an error: running the demo prompts instead
    would pass them off as the user's; bytes that are not UTF-8 text are one too (a binary file given
    by mistake would otherwise be generated from)."""
    flag = f"--prompts-file {path}"
    if not path.exists():
        raise FileNotFoundError(f"{flag} does not exist")
    if not path.is_file():
        raise ValueError(f"{flag} is not a file")
    try:
        data = path.read_bytes()
    except OSError as e:  # unreadable: not a ValueError, so it was a traceback
        raise ValueError(f"{flag} cannot be read: {e.strerror}") from None
    if b"\0" in data:
        raise ValueError(f"{flag} is not a text file (it holds NUL bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{flag} holds no prompts (one a line; blank lines are skipped)")
    return prompts


def sampling_params(args):
    from moe_serve.engine.sampling_params import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, seed=args.seed, stop=args.stop,
                          stop_token_ids=args.stop_token_ids, ignore_eos=args.ignore_eos)


def load_table(load: np.ndarray) -> str:
    """One line per MoE layer: tokens, min/max per expert, max/mean imbalance, hottest experts."""
    lines = [f"{'layer':>5} {'tokens':>8} {'min':>6} {'max':>6} {'max/mean':>8}  hottest experts (share)"]
    for layer, row in enumerate(load):
        total = int(row.sum())
        mean = total / max(1, len(row))
        hot = np.argsort(-row, kind="stable")[:4]
        hottest = " ".join(f"{e}({row[e] / max(1, total):.0%})" for e in hot)
        lines.append(f"{layer:>5} {total:>8} {int(row.min()):>6} {int(row.max()):>6} "
                     f"{row.max() / mean if mean else 0:>8.2f}  {hottest}")
    return "\n".join(lines)


@contextmanager
def _generate(args, **extra):
    """(llm, outputs, seconds) of the prompts, inside the engine's lifetime: the engine is closed on leaving
    the block, also when generation raises (a prompt over max_model_len left its threads running)."""
    from moe_serve.engine.llm import LLM

    prompts, params = read_prompts(args), sampling_params(args)
    options = config_kwargs(args, *ENGINE_SECTIONS)
    options.setdefault("model", DEFAULT_MODEL)
    options["generation_config"] = "none"  # the sampling flags say it all: generation_config.json is not read
    options.update(extra)
    # closing the engine writes its trace, also after a failure: to a file beside the one asked for, which
    # replaces it only when the run succeeded (a failed run wrote an empty trace over a good one)
    trace = Path(options["record_trace"]) if options.get("record_trace") else None
    part = trace.with_name(f".{trace.name}.{os.getpid()}.part") if trace else None
    if part:
        flag = "--record-trace" if "record_trace" not in extra else "--out"
        output_file(str(trace), flag)  # as the engine would
        _not_an_input(flag, str(trace), args, options)
        options["record_trace"] = str(part)
    try:
        with LLM(**options) as llm:
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            yield llm, outs, time.perf_counter() - t0
        if part:
            os.replace(part, trace)
    finally:
        if part:
            part.unlink(missing_ok=True)


def _not_an_input(flag: str, trace: str, args, options: dict) -> None:
    """ValueError when the trace to record names a file the run reads: the recording, written at the end,
    replaced the prompts file or the trace replayed (the engine sees only the recording's .part name)."""
    for other, path in (("--prompts-file", args.prompts_file), ("--replay-trace", options.get("replay_trace"))):
        if path and same_file(trace, path):
            raise ValueError(f"{flag} {trace} is also {other} {path}: the recording would replace it; "
                             "name another file")


def run_generate(args) -> int:
    with _generate(args) as (llm, outs, elapsed):
        for i, out in enumerate(outs):
            print(f"--- [{i}] {out.prompt!r} ({out.finish_reason}, {len(out.token_ids)} tokens)")
            print(out.prompt + out.text)
        n_out = sum(len(o.token_ids) for o in outs)
        n_in = sum(len(o.prompt_token_ids) for o in outs)
        ttft = [o.metrics.time_to_first_token for o in outs if o.metrics.time_to_first_token is not None]
        tpot = [o.metrics.time_per_output_token for o in outs if o.metrics.time_per_output_token is not None]
        print(f"\n{len(outs)} requests, {n_in} prompt + {n_out} output tokens in {elapsed:.2f} s: "
              f"{n_out / elapsed:.1f} output tokens/s, {(n_in + n_out) / elapsed:.1f} total tokens/s")
        if ttft:  # TPOT needs a second token: with one token per request there is none to print (not nan)
            tpot_text = (f"time per output token {np.mean(tpot) * 1e3:.1f} ms (mean)" if tpot
                         else "no time per output token (no request made a second token)")
            print(f"time to first token {np.mean(ttft) * 1e3:.1f} ms (mean), {tpot_text}")
        load = llm.expert_load()
        if load is not None:
            print("\nexpert load per MoE layer (tokens routed to each expert):")
            print(load_table(load))
    return 0


def run_info(args) -> int:
    path = Path(args.model_dir)
    if not path.exists():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory (a checkpoint directory holds config.json and *.safetensors)")
    print(format_info(model_info(args.model_dir)))
    return 0


def run_record_trace(args) -> int:
    from predictors.traces import load_trace

    output_file(args.out, "--out")
    with _generate(args, record_trace=str(args.out)) as (_, _, elapsed):
        pass  # the trace is written as the engine closes
    trace = load_trace(args.out)
    print(f"wrote {args.out}: {trace.num_sequences} sequences, {trace.num_tokens} tokens, "
          f"{trace.num_layers} MoE layers, top-{trace.top_k} of {trace.num_experts} experts"
          f"{', hidden states' if trace.hidden is not None else ''} ({elapsed:.2f} s)")
    return 0
