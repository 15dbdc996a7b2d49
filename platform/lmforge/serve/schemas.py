"""OpenAI-compatible request and response bodies, validated by pydantic."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

# Bounds that keep every accepted request decodable, so none can fail in the engine (where
# it would share a batch with others). A seed is an int64, so choice i of n (seed + i,
# n <= MAX_N) stays within torch.Generator.manual_seed's range [-2**63, 2**64 - 1].
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1
MAX_N = 8
MAX_TOP_K = 1_000_000
"""Above any vocabulary served here; the sampler treats top_k >= the vocabulary as no cut."""
MAX_STOP_CHARS = 256
"""A stop sequence is looked for after every token, so its length is a per-token cost."""


def _valid_unicode(value: Any) -> Any:
    """Refuse text that is not valid Unicode: JSON's `\\ud800` escapes decode to a lone
    surrogate, which no tokenizer (nor UTF-8) can take."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"not valid Unicode: a lone surrogate at character {e.start}"
                             ) from None
    return value


Text = Annotated[str, BeforeValidator(_valid_unicode)]
"""A string that can be encoded as UTF-8 (422 naming the field otherwise)."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    """Send a last chunk with `usage` (and no choices) before `data: [DONE]`."""


class SamplingRequest(BaseModel):
    """The sampling fields `/v1/completions` and `/v1/chat/completions` share. Unknown
    fields are refused (422 naming them), never silently ignored."""

    model_config = ConfigDict(extra="forbid")

    model: Text | None = None
    """`NAME`, `NAME@ALIAS` or `NAME/VERSION` of the model served; unset: that one."""
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=MAX_TOP_K)
    """0: no top-k cut (an extension; OpenAI has no top_k)."""
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    user: Text | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [_valid_unicode(s) for s in ([v] if isinstance(v, str) else v)]
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty stop sequences")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence has at most {MAX_STOP_CHARS} characters")
        return stops


class CompletionRequest(SamplingRequest):
    """`POST /v1/completions`."""

    prompt: Text = Field(min_length=1)
    max_tokens: int = Field(16, ge=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Text
    name: Text | None = None


class ChatCompletionRequest(SamplingRequest):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name for max_tokens; wins when both are given."""


class Choice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


def error_body(message: str, param: str | None, kind: str = "invalid_request_error"
               ) -> dict[str, Any]:
    """The OpenAI error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
