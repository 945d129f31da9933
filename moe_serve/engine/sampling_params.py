"""How to sample one request, with vLLM's field names so users' code carries over.

Validated on construction: an impossible value raises ValueError naming the field and the limit,
before the request ever reaches the engine.
"""
from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass, field

_EPS = 1e-5  # temperatures below this are greedy (as in vLLM)
MAX_LOGPROBS = 20  # vLLM's default max_logprobs, and OpenAI's top_logprobs limit
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]
_GOLDEN = 0x9E3779B97F4A7C15  # spreads (seed, index) over the seed space


def completion_seed(seed: int, index: int) -> int:
    """The seed completion `index` of a seeded request samples with: completion 0 keeps the request's
    seed (so n = 1 gives the text it always gave, and completion 0 of any n that text), completion
    i > 0 uses (seed + i * 0x9E3779B97F4A7C15) mod 2**63. The same request gives the same n texts."""
    return seed if index == 0 else (seed + index * _GOLDEN) % 2**63


class RequestOutputKind(enum.IntEnum):
    """What a streamed output carries (vLLM's names and values): CUMULATIVE, the completion's text,
    token_ids and logprobs so far; DELTA, only what is new since its previous output (as delta_*);
    FINAL_ONLY, no output until the completion finishes (then its whole text)."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = -1  # keep the k most likely tokens; -1 (or 0) = all
    max_tokens: int | None = 16  # most tokens to generate; None = up to the context limit
    seed: int | None = None  # per-request seed: the same seed, prompt and params give the same text
    stop: str | list[str] | None = None  # stop strings; the output is cut before the first one
    stop_token_ids: list[int] | None = None  # tokens that end the request (kept in token_ids)
    ignore_eos: bool = False  # keep generating past the model's end-of-sequence token
    n: int = 1  # completions per prompt, each sampled on its own (seeds: completion_seed)
    skip_special_tokens: bool = True  # leave special tokens out of the text
    # log-probabilities per output token: the sampled token's plus the `logprobs` most likely (0..20);
    # None = none. Raw: log_softmax of the model's logits, before penalties, temperature, top-k/top-p
    logprobs: int | None = None
    presence_penalty: float = 0.0  # OpenAI's, in [-2, 2]: minus this for every token already in the output
    frequency_penalty: float = 0.0  # OpenAI's, in [-2, 2]: minus this times the token's count in the output
    repetition_penalty: float = 1.0  # vLLM's, > 0: a token in the prompt or output has its logit divided
    # by it when positive, multiplied when negative (1 = none)
    # OpenAI's: {token id: bias in [-100, 100]} added to that token's logit before sampling (not to logprobs)
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0  # vLLM's: end-of-sequence and stop_token_ids cannot end the request (nor stop
    # strings) before this many output tokens
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE  # vLLM's: what a streamed output carries
    stop_list: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        def fail(name: str, limit: str, value) -> None:
            raise ValueError(f"SamplingParams.{name} must be {limit}, got {value!r}")

        def number(value, kinds=(int, float)) -> bool:  # bool is an int to Python, but True is no temperature
            return isinstance(value, kinds) and not isinstance(value, bool)

        self._take_numpy_numbers()
        if not number(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            fail("temperature", "a number in [0, 100]", self.temperature)
        if not number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            fail("top_p", "in (0, 1]", self.top_p)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            fail("top_k", "-1 (all), 0 (all) or a positive integer", self.top_k)
        if self.max_tokens is not None and (not number(self.max_tokens, int) or self.max_tokens < 1):
            fail("max_tokens", ">= 1 (or None)", self.max_tokens)
        if self.seed is not None and (not number(self.seed, int) or not 0 <= self.seed < 2**63):
            fail("seed", "an integer in [0, 2**63)", self.seed)
        if self.logprobs is not None and (not number(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            fail("logprobs", f"an integer in [0, {MAX_LOGPROBS}] (or None)", self.logprobs)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not number(value) or not math.isfinite(value) or not -2.0 <= value <= 2.0:
                fail(name, "a number in [-2, 2]", value)
        if not number(self.repetition_penalty) or not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            fail("repetition_penalty", "a finite number > 0 (1 = no penalty)", self.repetition_penalty)
        if not number(self.n, int) or self.n < 1:
            fail("n", "an integer >= 1", self.n)
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            fail("stop", "a non-empty string or a list of non-empty strings", self.stop)  # not list(5)'s TypeError
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or s == "" for s in stop):
            fail("stop", "a non-empty string or a list of non-empty strings", self.stop)
        self.stop_list = stop
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            fail("stop_token_ids", "a list of non-negative integers", self.stop_token_ids)
        ids = list(self.stop_token_ids or [])
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in ids):
            fail("stop_token_ids", "a list of non-negative integers", self.stop_token_ids)
        self.stop_token_ids = ids
        if not number(self.min_tokens, int) or self.min_tokens < 0 or (
                self.max_tokens is not None and self.min_tokens > self.max_tokens):
            fail("min_tokens", f"an integer in [0, max_tokens={self.max_tokens}]", self.min_tokens)
        self._check_logit_bias(fail, number)
        if not number(self.output_kind, int) or self.output_kind not in tuple(RequestOutputKind):
            fail("output_kind", "a RequestOutputKind (CUMULATIVE, DELTA or FINAL_ONLY)", self.output_kind)
        self.output_kind = RequestOutputKind(self.output_kind)

    def _check_logit_bias(self, fail, number) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        limit = f"a dict of token id (int >= 0) -> number in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
        if not isinstance(bias, dict):
            fail("logit_bias", limit, bias)
        taken = {}
        for t, v in bias.items():
            t = int(t) if isinstance(t, numbers.Integral) and not isinstance(t, bool) else t
            v = float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else v
            if not number(t, int) or t < 0 or not number(v) or not math.isfinite(v) or abs(v) > MAX_LOGIT_BIAS:
                fail("logit_bias", limit, {t: v})
            taken[t] = v
        self.logit_bias = taken or None

    _REALS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
    _INTEGERS = ("top_k", "max_tokens", "seed", "logprobs", "min_tokens")

    def _take_numpy_numbers(self) -> None:
        """numpy's numbers (np.int64 from array arithmetic, np.float32) as Python's, as prompts' token ids
        are taken; they were refused with the field's range, which they met. Bools stay what they are."""
        def python(value, kind, abc):
            fits = isinstance(value, abc) and not isinstance(value, (bool, int, float))
            return kind(value) if fits and not type(value).__name__.startswith("bool") else value

        for name in self._REALS:
            setattr(self, name, python(getattr(self, name), float, numbers.Real))
        for name in self._INTEGERS:
            setattr(self, name, python(getattr(self, name), int, numbers.Integral))
        ids = self.stop_token_ids
        if hasattr(ids, "tolist") and getattr(ids, "ndim", None) == 1:  # a 1-D integer array or tensor
            ids = ids.tolist()
        if isinstance(ids, (list, tuple)):
            self.stop_token_ids = [python(t, int, numbers.Integral) for t in ids]

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def extra_work(self) -> bool:
        """Asks the engine for per-step work past plain sampling (logprobs, penalties, logit_bias, min_tokens)."""
        return self.logprobs is not None or self.penalized or self.logit_bias is not None or self.min_tokens > 0

    @property
    def greedy(self) -> bool:
        return self.temperature < _EPS

    @property
    def effective_top_k(self) -> int:
        """0 means no top-k cut."""
        return 0 if self.top_k in (-1, 0) else self.top_k

    def check_vocab(self, vocab_size: int) -> None:
        """Token-id fields against the model's vocabulary (known only once a model is loaded)."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias keys", list(self.logit_bias or ()))):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(f"SamplingParams.{name} must be < vocab size {vocab_size}, got {bad[:5]}")
