"""`LLM`: offline generation from Python, vLLM-style.

    from moe_serve import LLM, SamplingParams
    with LLM(model="path/to/checkpoint", max_num_seqs=8) as llm:
        outs = llm.generate(["Once upon a time"], SamplingParams(max_tokens=32))
        print(outs[0].outputs[0].text, outs[0].finish_reason, outs[0].metrics.time_to_first_token)

Flat keyword options are the config fields (`EngineConfig.from_flat`). All prompts are validated
before any work starts (a bad one raises ValueError naming `prompts[i]`); they are then fed to the
engine as its queue has room, and outputs come back in prompt order, each holding its prompt's
`SamplingParams.n` completions in `outputs` (index order; `out.text` is `out.outputs[0].text`).
"""
from __future__ import annotations

from typing import Callable

from moe_serve.config import DEFAULT_MODEL, EngineConfig
from moe_serve.engine.llm_engine import LLMEngine, Prompt, as_token_ids
from moe_serve.engine.sampling_params import SamplingParams
from moe_serve.engine.outputs import CompletionOutput, RequestOutput, merge_metrics


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    ndim = getattr(prompts, "ndim", None)  # numpy arrays and torch tensors
    if ndim == 2:  # one prompt per row
        return list(prompts)
    if ndim == 1 or (isinstance(prompts, (list, tuple)) and prompts):
        ids = as_token_ids(prompts)
        if ids is not None:
            return [ids]  # one prompt of token ids
    if isinstance(prompts, (list, tuple)):
        return list(prompts)
    raise ValueError(f"prompts must be a string, a list of strings or a list of token-id lists, got {type(prompts).__name__}")


def _finished_output(group, completions: dict[int, CompletionOutput]) -> RequestOutput:
    """One prompt's RequestOutput from its finished completions, in index order."""
    first, outputs = group[0], [completions[i] for i in range(len(group))]
    return RequestOutput(request_id=first.request_id, prompt=first.prompt, prompt_token_ids=first.shown_prompt_ids(),
                         outputs=outputs, finished=True, metrics=merge_metrics([c.metrics for c in outputs]))


def _progress_bar(use_tqdm, total: int):
    """LLM.generate's progress bar over `total` prompts (None when not asked for), built as vLLM builds it."""
    if use_tqdm is False:
        return None
    if use_tqdm is True:
        from tqdm.auto import tqdm as use_tqdm
    return use_tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, **options):
        self.config = EngineConfig.from_flat(model=str(model), **options)
        self.engine = LLMEngine(self.config)
        self.engine.stream = False  # only final outputs are needed: no per-step deltas or decoding

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The SamplingParams `generate` uses when given none, as vLLM's: the checkpoint's
        generation_config.json sampling fields (model option generation_config="auto"), else the built-in ones."""
        return self.engine.default_sampling_params()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
                 use_tqdm: bool | Callable = False, lora_request=None) -> list[RequestOutput]:
        """One finished RequestOutput per prompt, in prompt order, with its n completions. Without
        sampling_params (or for a None in the list) the engine uses get_default_sampling_params().

        As vLLM's: `use_tqdm` shows a progress bar over finished prompts (True: tqdm's, or a tqdm-like
        class or function to build it with); off by default here (vLLM's is on), as generate has always
        been quiet. `lora_request` may only be None: moe-serve serves no LoRA adapters."""
        if self.engine.model is None:
            raise RuntimeError("LLM is closed")
        if lora_request is not None:
            raise ValueError(f"lora_request: LoRA adapters are not supported by moe-serve, got "
                             f"{type(lora_request).__name__}; pass None")
        if not (isinstance(use_tqdm, bool) or callable(use_tqdm)):
            raise ValueError(f"use_tqdm must be a bool or a tqdm-like callable, got {type(use_tqdm).__name__}")
        plist = _as_prompt_list(prompts)
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(plist)
        if len(params) != len(plist):
            raise ValueError(f"sampling_params: got {len(params)} for {len(plist)} prompts")
        groups = []  # per prompt, its n sequences
        for i, (p, sp) in enumerate(zip(plist, params)):
            try:
                groups.append(self.engine.make_request(p, sp))  # request id: the engine's "req-<seq id>"
            except ValueError as exc:
                raise ValueError(f"prompts[{i}]: {exc}") from exc
        done: dict[str, dict[int, CompletionOutput]] = {g[0].request_id: {} for g in groups}
        group_of = {g[0].request_id: g for g in groups}
        todo, unfinished = list(groups), sum(len(g) for g in groups)
        bar = _progress_bar(use_tqdm, len(groups))
        try:
            while todo or unfinished:
                while todo and self.engine.queue_has_room(len(todo[0])):
                    self.engine.submit(todo.pop(0))
                for out in self.engine.step():  # finished completions only (stream off)
                    if out.request_id in done:  # not a request of an interrupted call
                        mine = done[out.request_id]
                        for c in out.outputs:
                            if c.finished() and c.index not in mine:
                                mine[c.index] = c
                                unfinished -= 1
                                if bar is not None and len(mine) == len(group_of[out.request_id]):
                                    bar.update(1)  # the prompt's last completion
        except BaseException:  # e.g. Ctrl-C: nobody will read these requests, a later call must not run them
            for g in groups:
                self.engine.abort(g[0].request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [_finished_output(g, done[g[0].request_id]) for g in groups]

    def expert_load(self):
        return self.engine.expert_load()

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
