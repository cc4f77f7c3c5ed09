"""OpenAI API shapes: request models (validated strictly, so a wrong type is a 400 that names the
field) and the response and stream-chunk builders. No Ray and no engine here.

Extensions beyond OpenAI's API, as vLLM has them: `top_k`, `min_p`, `repetition_penalty`,
`ignore_eos`; every response also carries `adapter: {"id", "version"}` (null for the base model) and
`system_fingerprint` = `id@version`.

Every field is either honoured or refused with a 400 naming it: a request's unknown fields are refused
(`extra="forbid"`), and a known field is accepted only with the values this server implements
(`response_format` text, no `tools`, `tool_choice` none, `best_of` 1, no `suffix`). A client that asks
for JSON output and gets prose would have been lied to.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jaxlora.sampling import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_REPETITION_PENALTY, MAX_TOP_K

Text = Annotated[str, Field(max_length=1_000_000)]


class _Strict(BaseModel):
    # strict: "8" is not a number and 1 is not a bool; a field this server does not implement is refused
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: the usage so far in every chunk (guidellm asks for it)


class _SamplingFields(_Strict):
    model: Annotated[str, Field(min_length=1, max_length=200)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1, le=MAX_TOP_K)] = 0  # -1 or 0: off (vLLM uses -1)
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    stop: Annotated[str, Field(max_length=1000)] | Annotated[list[Annotated[str, Field(max_length=1000)]], Field(max_length=8)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    n: Annotated[int, Field(ge=1, le=1)] = 1
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=MAX_REPETITION_PENALTY)] = 1.0  # vLLM's: prompt and output tokens
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0  # vLLM's
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]], Field(max_length=MAX_LOGIT_BIAS)] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not key.isdigit():
                raise ValueError(f"keys are token ids (non-negative integers as strings), got {key!r}")
        return v

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """The bias as the engine takes it: (token id, bias) pairs, sorted by token id."""
        return tuple(sorted((int(k), float(b)) for k, b in (self.logit_bias or {}).items()))

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_SamplingFields):
    prompt: Text | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=100_000)] \
        | Annotated[list[Text], Field(min_length=1, max_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: Literal[False] = False
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("best_of")
    @classmethod
    def _one_candidate(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError(f"only best_of=1 is supported (one candidate per request), got {v}")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix (insertion after the completion) is not supported; send the prompt only")
        return v


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[TextPart], Field(max_length=100)] | None = None
    name: str | None = None
    # What the openai client echoes back of an earlier assistant turn; accepted when empty.
    refusal: str | None = None
    tool_calls: Annotated[list[Any], Field(max_length=0)] | None = None
    function_call: None = None
    audio: None = None
    annotations: Annotated[list[Any], Field(max_length=0)] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1000)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict | None) -> dict | None:
        if v is not None and v != {"type": "text"}:
            raise ValueError(f"only {{'type': 'text'}} is supported: this server cannot constrain output to JSON (got {v})")
        return v

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list | None) -> list | None:
        if v:
            raise ValueError("tool calling is not supported: send no tools")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v):
        if v not in (None, "none"):
            raise ValueError(f"tool calling is not supported: tool_choice may only be 'none', got {v!r}")
        return v

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def adapter_fields(adapter: dict | None, base_model: str) -> dict[str, Any]:
    """`adapter` is {"id", "version"} or None (base model)."""
    fingerprint = base_model if adapter is None else f"{adapter['id']}@{adapter['version']}"
    return {"adapter": adapter, "system_fingerprint": fingerprint}


class LogprobsBuilder:
    """Accumulates per-token logprobs in the completions (legacy) or chat format."""

    def __init__(self, decode_token, chat: bool):
        self._decode = decode_token  # token id -> its text
        self._chat = chat
        self.content: list[dict] = []
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[dict[str, float]] = []
        self.text_offset: list[int] = []

    def add(self, token_id: int, logprob: float, top: list[list], offset: int) -> dict:
        """Records one token; returns just this token's entry in the request's format."""
        text = self._decode(token_id)
        if self._chat:
            entry = {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace")),
                     "top_logprobs": [{"token": self._decode(t), "logprob": lp,
                                       "bytes": list(self._decode(t).encode("utf-8", "replace"))} for t, lp in top]}
            self.content.append(entry)
            return {"content": [entry]}
        top_map = {self._decode(t): lp for t, lp in top}
        self.tokens.append(text)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top_map)
        self.text_offset.append(offset)
        return {"tokens": [text], "token_logprobs": [logprob], "top_logprobs": [top_map], "text_offset": [offset]}

    def result(self) -> dict:
        if self._chat:
            return {"content": self.content}
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}
