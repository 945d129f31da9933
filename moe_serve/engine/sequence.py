"""One request's state inside the engine, and what the engine hands back for it (RequestOutput).

A request is one sequence (n=1): prompt tokens, then generated tokens. `num_computed` counts the
tokens already in its KV-cache slot; the next forward feeds `token_ids[num_computed:]` (a prefill
chunk, or the one token sampled last step).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from moe_serve.engine.detokenizer import IncrementalDetokenizer
from moe_serve.engine.logprobs import TokenLogprob
from moe_serve.engine.sampling_params import SamplingParams

FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        """Mean time between output tokens after the first (decode speed seen by this request)."""
        if self.num_output_tokens < 2 or self.first_token_time is None:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_output_tokens - 1)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str  # cumulative
    token_ids: list[int]  # cumulative
    delta_text: str  # new since the previous output of this request
    delta_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" once finished
    error: str | None
    metrics: RequestMetrics
    # one per token of token_ids (cumulative) when the request asked (SamplingParams.logprobs), else None
    logprobs: list[TokenLogprob] | None = None


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
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens already in the KV cache
    slot: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    sent_text: int = 0  # characters of text already returned
    sent_ids: int = 0  # output tokens already returned
    metrics: RequestMetrics = None  # type: ignore[assignment]
    logprobs: list[TokenLogprob] | None = None  # one per output token, when params.logprobs is set

    def __post_init__(self):
        self.metrics = RequestMetrics(arrival_time=self.arrival_time, num_prompt_tokens=len(self.prompt_ids))
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

    def make_output(self) -> RequestOutput:
        """Cumulative text and ids plus what is new since the previous output."""
        text = self.detok.visible(self.finished)
        out = RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_ids,
            text=text,
            token_ids=list(self.output_ids),
            delta_text=text[self.sent_text:],
            delta_token_ids=self.output_ids[self.sent_ids:],
            finished=self.finished,
            finish_reason=self.finish_reason,
            error=self.error,
            metrics=self.metrics,
            logprobs=None if self.logprobs is None else list(self.logprobs),
        )
        self.sent_text, self.sent_ids = len(text), len(self.output_ids)
        return out
