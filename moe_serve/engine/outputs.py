"""What the engine hands back for a request, in vLLM's shape: a RequestOutput holding one
CompletionOutput per completion (`SamplingParams.n` of them), each with its `index`.

vLLM users write `out.outputs[0].text`; earlier moe-serve users wrote `out.text`. Both work: the flat
fields (`text`, `token_ids`, `delta_text`, `delta_token_ids`, `finish_reason`, `error`, `logprobs`,
`delta_logprobs`) are those of `outputs[0]`. A finished output of `LLM.generate` holds all n completions
in index order; a streamed output (AsyncEngine, LLMEngine.step) holds the completion that changed, as
vLLM streams n > 1, so there `outputs[0]` is that completion (with n = 1, always the only one).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from moe_serve.engine.logprobs import TokenLogprob


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


def merge_metrics(parts: list[RequestMetrics]) -> RequestMetrics:
    """A request's metrics from its completions': one part is returned as it is; several give the
    earliest first token, the latest last token and finish (None while one is unfinished), and the
    output tokens summed (so time_per_output_token is the request's time per token it produced)."""
    if len(parts) == 1:
        return parts[0]
    firsts = [m.first_token_time for m in parts if m.first_token_time is not None]
    lasts = [m.last_token_time for m in parts if m.last_token_time is not None]
    finishes = [m.finished_time for m in parts]
    return RequestMetrics(arrival_time=min(m.arrival_time for m in parts),
                          first_token_time=min(firsts) if firsts else None,
                          last_token_time=max(lasts) if lasts else None,
                          finished_time=None if None in finishes else max(finishes),
                          num_prompt_tokens=parts[0].num_prompt_tokens,
                          num_output_tokens=sum(m.num_output_tokens for m in parts))


class Prefix:
    """The first `n` items of a list its owner only ever appends to (a sequence's output ids and
    logprobs), copied into a list of the reader's own on first read. An output is made every step of a
    stream; copying its cumulative lists there cost O(length) per step (a 4,000-token stream spent
    ~3% of its time in those copies) for consumers that mostly read the deltas. Reading pays the copy
    once per output, and the list read is the reader's: changing it reaches neither the engine nor
    any other output."""

    __slots__ = ("_source", "_n", "_copy")

    def __init__(self, source: list, n: int):
        self._source, self._n, self._copy = source, n, None

    def get(self) -> list:
        if self._copy is None:
            self._copy, self._source = self._source[:self._n], None  # a slice: atomic under the GIL
        return self._copy


class CopiedOnRead:
    """A CompletionOutput field given a list or a Prefix: reading it gives a list, the Prefix's copy made
    on the first read. A descriptor, so CompletionOutput stays a dataclass (asdict, replace, ==)."""

    def __set_name__(self, owner, name):
        self.slot = "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:  # read on the class: the dataclass field has no default
            raise AttributeError(self.slot[1:])
        value = obj.__dict__[self.slot]
        if isinstance(value, Prefix):
            value = obj.__dict__[self.slot] = value.get()
        return value

    def __set__(self, obj, value):
        obj.__dict__[self.slot] = value


@dataclass
class CompletionOutput:
    """One completion of a request (vLLM's CompletionOutput, plus the deltas a stream needs).

    `token_ids` and `logprobs` are cumulative, copied when first read (see Prefix): a streaming
    consumer that reads only `delta_token_ids` / `delta_logprobs` pays nothing for the length."""

    index: int  # which of the request's n completions
    text: str  # cumulative
    token_ids: list[int] = CopiedOnRead()  # cumulative
    # one per token of token_ids (cumulative) when the request asked (SamplingParams.logprobs), else None
    logprobs: list[TokenLogprob] | None = CopiedOnRead()
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" once this completion finished
    delta_text: str = ""  # new since this completion's previous output
    delta_token_ids: list[int] = field(default_factory=list)
    error: str | None = None  # why it ended, for finish_reason "error"
    metrics: RequestMetrics | None = None  # this completion's own timings
    # the logprobs of delta_token_ids when the request asked for logprobs, else None
    delta_logprobs: list[TokenLogprob] | None = None

    def finished(self) -> bool:  # a method, as vLLM's
        return self.finish_reason is not None

    @property
    def cumulative_logprob(self) -> float | None:
        """Sum of the sampled tokens' log-probabilities, when logprobs were asked for (as vLLM)."""
        return None if self.logprobs is None else sum(lp.logprob for lp in self.logprobs)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool  # every completion of the request has finished
    metrics: RequestMetrics  # the request's (merge_metrics of its completions')

    # the flat fields: those of outputs[0] (see the module docstring)
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def delta_text(self) -> str:
        return self.outputs[0].delta_text

    @property
    def delta_token_ids(self) -> list[int]:
        return self.outputs[0].delta_token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def error(self) -> str | None:
        return self.outputs[0].error

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        return self.outputs[0].logprobs

    @property
    def delta_logprobs(self) -> list[TokenLogprob] | None:
        return self.outputs[0].delta_logprobs
