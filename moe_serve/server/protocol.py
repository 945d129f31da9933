"""OpenAI request and response bodies as pydantic models.

Requests forbid unknown fields (the OpenAI API answers 400 "Unrecognized request argument") and
carry their limits in the schema, so FastAPI rejects impossible values before they reach the engine
and the OpenAPI spec tells clients (and the schema fuzzer) what is valid. A few vLLM extensions
(`top_k`, `stop_token_ids`, `ignore_eos`) are accepted because vLLM users send them.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationInfo,
                      field_validator)

TokenId = Annotated[StrictInt, Field(ge=0)]
Stop = StrictStr | Annotated[list[StrictStr], Field(max_length=16)] | None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """The sampling fields completions and chat share (OpenAI names, plus vLLM's extensions)."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    # StrictFloat: a JSON number (an integer is fine), never "0.5" or true, as the int/str/bool fields are strict
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None  # vLLM: -1 or 0 mean all tokens
    n: Annotated[StrictInt, Field(ge=1)] = 1  # one choice per request: n > 1 is refused
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63)] | None = None
    stop: Stop = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: StrictFloat | None = None  # only 0 (no penalty) is supported
    frequency_penalty: StrictFloat | None = None  # only 0 (no penalty) is supported
    user: StrictStr | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value):
        if value != 1:
            raise ValueError("only n=1 is supported (one choice per request)")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, value):
        if value not in (None, 0, 0.0):
            raise ValueError("penalties are not supported: only 0 (or null) is accepted")
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
    logprobs: Annotated[StrictInt, Field(ge=0, le=0)] | None = None  # not supported: only null/0


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
    logprobs: StrictBool | None = None
    add_generation_prompt: StrictBool = True  # vLLM extension

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value:
            raise ValueError("logprobs are not supported by this server")
        return value

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


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
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


class ChatChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
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
