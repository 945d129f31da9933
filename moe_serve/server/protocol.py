"""OpenAI request and response bodies as pydantic models.

Requests forbid unknown fields (the OpenAI API answers 400 "Unrecognized request argument") and
carry their limits in the schema, so FastAPI rejects impossible values before they reach the engine
and the OpenAPI spec tells clients (and the schema fuzzer) what is valid. A few vLLM extensions
(`top_k`, `stop_token_ids`, `ignore_eos`, `repetition_penalty`, `min_tokens`) are accepted because vLLM
users send them. `response_format` is accepted as {"type": "text"} only (there is no structured output).
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationInfo,
                      field_validator, model_serializer)

TokenId = Annotated[StrictInt, Field(ge=0)]
MAX_LOGPROBS = 20  # as SamplingParams (vLLM's max_logprobs; OpenAI's top_logprobs limit)
NumLogprobs = Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)]
Penalty = Annotated[StrictFloat, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]  # OpenAI's range
MAX_N = 16  # choices per request: n completions of one engine request, so n KV slots / queue places
Stop = StrictStr | Annotated[list[StrictStr], Field(max_length=16)] | None
MAX_LOGIT_BIAS_ENTRIES = 1024
Bias = Annotated[StrictFloat, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]  # OpenAI's range


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


def _null_is_the_default(cls, value, info: ValidationInfo):
    """OpenAI's API takes null for these fields (clients that build bodies from optional values send it)
    and means the default; the field keeps its plain type for the handlers."""
    return cls.model_fields[info.field_name].default if value is None else value


class SamplingFields(BaseModel):
    """The sampling fields completions and chat share (OpenAI names, plus vLLM's extensions)."""

    model_config = ConfigDict(extra="forbid")
    _nullable = field_validator("n", "stream", "ignore_eos", "min_tokens", mode="before")(_null_is_the_default)

    model: StrictStr | None = None
    # StrictFloat: a JSON number (an integer is fine), never "0.5" or true, as the int/str/bool fields are strict
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None  # vLLM: -1 or 0 mean all tokens
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1  # independent choices, each with its own index
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63)] | None = None
    stop: Stop = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None  # minus this for every token already in the output
    frequency_penalty: Penalty | None = None  # minus this times the token's count in the output
    repetition_penalty: Annotated[StrictFloat, Field(gt=0.0, allow_inf_nan=False)] | None = None  # vLLM's; 1 = none
    user: StrictStr | None = None
    # {token id (a JSON key, so a string): bias}, added to that token's logit before sampling
    logit_bias: Annotated[dict[StrictStr, Bias], Field(max_length=MAX_LOGIT_BIAS_ENTRIES)] | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0  # vLLM's: no EOS / stop before this many tokens
    response_format: dict | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys_are_token_ids(cls, value):
        if value is None:
            return None
        bad = [k for k in value if not (k.isascii() and k.isdigit())]
        if bad:
            raise ValueError(f"keys must be token ids (non-negative integers, as strings), got {bad[0]!r}")
        return {int(k): v for k, v in value.items()}

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        if value is not None and value.get("type") != "text":
            raise ValueError(f'only {{"type": "text"}} is supported: this server has no structured (JSON) '
                             f"output, got type {value.get('type')!r}")
        return value

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return value


class CompletionRequest(SamplingFields):
    prompt: Annotated[StrictStr, Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)] | Annotated[
        list[StrictStr], Field(min_length=1, max_length=1)
    ] | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = 16  # OpenAI's default for completions
    echo: StrictBool = False
    logprobs: NumLogprobs | None = None  # the sampled token's log-probability plus the `logprobs` most likely
    _nullable_echo = field_validator("echo", mode="before")(_null_is_the_default)

    @field_validator("logprobs")
    @classmethod
    def _no_prompt_logprobs(cls, value, info: ValidationInfo):
        if value is not None and info.data.get("echo"):
            raise ValueError("logprobs with echo would need the prompt's log-probabilities, which this server "
                             "does not compute; drop echo or logprobs")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | Annotated[list["ContentPart"], Field(min_length=1)]
    name: StrictStr | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool | None = None  # the output tokens' log-probabilities
    top_logprobs: NumLogprobs | None = None  # and the `top_logprobs` most likely tokens at each step
    add_generation_prompt: StrictBool = True  # vLLM extension
    _nullable_prompt = field_validator("add_generation_prompt", mode="before")(_null_is_the_default)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs: true")
        return value

    @property
    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs: None unless logprobs is true, then top_logprobs (default 0)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


ChatMessage.model_rebuild()


# ---- responses -------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: per output token its text, offset in the choice's text,
    log-probability, and {token text: log-probability} of the most likely tokens and the sampled one."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    """A chat stream chunk's delta: only the fields it carries, as OpenAI sends them ({"role", "content"}
    first, {"content"} then, {} on the finish chunk); clients read it with delta.get("content", "")."""
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "moe-serve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class TraceRequest(BaseModel):
    """Body of POST /v1/traces/dump: where to write the trace (.npz) on the server's disk."""

    model_config = ConfigDict(extra="forbid")
    path: Annotated[StrictStr, Field(min_length=1)] | None = None


class TraceStartRequest(BaseModel):
    """Body of POST /v1/traces/start (optional)."""

    model_config = ConfigDict(extra="forbid")
    record_hidden: StrictBool = False
