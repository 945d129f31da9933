"""One completion's state inside the engine, and the output the engine hands back for it.

A request of `SamplingParams.n` completions is n sequences (its `group`, sharing the prompt and the
request id; `index` tells them apart), sampled and finished each on its own. The prompt is prefilled
once: a member admitted while another is prefilling it waits on that one (`fork_of`), then gets a copy
of its prompt KV and samples from the same last-position logits (scheduler.py, LLMEngine). A sequence is
prompt tokens, then generated tokens. `num_computed` counts the tokens already in its KV-cache slot;
the next forward feeds `token_ids[num_computed:]` (a prefill chunk, or the one token sampled last step).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from moe_serve.engine.detokenizer import IncrementalDetokenizer
from moe_serve.engine.logprobs import TokenLogprob
from moe_serve.engine.outputs import CompletionOutput, Prefix, RequestMetrics, RequestOutput, merge_metrics
from moe_serve.engine.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["FINISH_REASONS", "CompletionOutput", "RequestMetrics", "RequestOutput", "Sequence"]

FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    arrival_time: float = field(default_factory=time.monotonic)
    # output_ids and logprobs are only ever appended to: outputs hold prefixes of them (outputs.Prefix)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens already in the KV cache
    slot: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    sent_text: int = 0  # characters of text already returned
    sent_ids: int = 0  # output tokens already returned
    metrics: RequestMetrics = None  # type: ignore[assignment]
    logprobs: list[TokenLogprob] | None = None  # one per output token, when params.logprobs is set
    index: int = 0  # which completion of its request
    # the group member whose prefill this one waits to share (holds a slot, feeds no tokens), else None
    fork_of: "Sequence | None" = field(default=None, repr=False, compare=False)
    # the group member whose prompt KV (all but the last token) the engine copies into this one's slot
    # before the next forward (admitted after the prefill, see scheduler.py), else None
    kv_source: "Sequence | None" = field(default=None, repr=False, compare=False)
    # the request's n sequences, itself included (not in repr or ==: it holds itself)
    group: list["Sequence"] = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    # the prompt ids outputs hand out (see shown_prompt_ids); on the group's first sequence only
    _shown_prompt: list[int] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.metrics = RequestMetrics(arrival_time=self.arrival_time, num_prompt_tokens=len(self.prompt_ids))
        if self.group is None:
            self.group = [self]
        if self.params.logprobs is not None:
            self.logprobs = []

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefill_done(self) -> bool:
        """All prompt tokens are in the KV cache: every step from now on is a 1-token decode."""
        return self.num_computed >= len(self.prompt_ids)

    def pending_tokens(self, n: int) -> list[int]:
        """The next `n` tokens to feed the model."""
        start = self.num_computed
        if start < len(self.prompt_ids):
            return self.prompt_ids[start:start + n]
        return self.output_ids[start - len(self.prompt_ids):start - len(self.prompt_ids) + n]

    def append_token(self, token_id: int, now: float) -> None:
        self.output_ids.append(token_id)
        m = self.metrics
        m.num_output_tokens = len(self.output_ids)
        m.first_token_time = m.first_token_time or now
        m.last_token_time = now

    def finish(self, reason: str, error: str | None = None) -> None:
        assert reason in FINISH_REASONS, reason
        if self.finished:
            return
        self.finish_reason, self.error = reason, error
        self.metrics.finished_time = time.monotonic()
        try:
            self.detok.add(None, final=True)  # flush text held back for an incomplete character
        except Exception:  # noqa: BLE001 - the request ends anyway; its text stays as it was
            pass

    def shown_prompt_ids(self) -> list[int]:
        """The prompt ids this request's outputs carry: a copy of prompt_ids, made once per request and
        shared by its completions' outputs. Outputs reach their consumer while the engine still decodes
        the request (AsyncEngine: another thread), and prompt_ids sets its length, its decode positions
        and its penalties: a consumer changing the list it was given must not change those. A copy per
        output would cost O(prompt) per step; this one the engine never reads (vLLM, too, hands every
        output of a request the same list), so a change shows only in that consumer's later outputs."""
        head = self.group[0]
        if head._shown_prompt is None:
            head._shown_prompt = list(self.prompt_ids)
        return head._shown_prompt

    def make_output(self) -> RequestOutput:
        """The request's output carrying this completion: cumulative text and ids (only the new ones with
        output_kind DELTA) plus what is new since its previous output; `finished` once every completion
        of the request has finished."""
        text = self.detok.visible(self.finished)
        metrics = replace(self.metrics)  # a snapshot, the consumer's own (the engine updates the live one)
        delta_text, delta_ids = text[self.sent_text:], self.output_ids[self.sent_ids:]
        delta_lps = None if self.logprobs is None else self.logprobs[self.sent_ids:]
        if self.params.output_kind == RequestOutputKind.DELTA:  # the consumer's own lists, apart from delta_*
            shown, ids, lps = delta_text, list(delta_ids), None if delta_lps is None else list(delta_lps)
        else:  # cumulative, copied when read, not every step
            shown, ids = text, Prefix(self.output_ids, len(self.output_ids))
            lps = None if self.logprobs is None else Prefix(self.logprobs, len(self.logprobs))
        completion = CompletionOutput(index=self.index, text=shown, token_ids=ids, logprobs=lps,
                                      finish_reason=self.finish_reason, delta_text=delta_text,
                                      delta_token_ids=delta_ids, delta_logprobs=delta_lps, error=self.error,
                                      metrics=metrics)
        self.sent_text, self.sent_ids = len(text), len(self.output_ids)
        return RequestOutput(request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.shown_prompt_ids(),
                             outputs=[completion], finished=all(s.finished for s in self.group),
                             metrics=merge_metrics([metrics if s is self else s.metrics for s in self.group]))
