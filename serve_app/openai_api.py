"""OpenAI API shapes: request models (validated strictly, so a wrong type is a 400 that names the
field) and the response and stream-chunk builders. No Ray and no engine here.

Extensions beyond OpenAI's API, as vLLM has them: `top_k`, `ignore_eos`; every response also carries
`adapter: {"id", "version"}` (null for the base model) and `system_fingerprint` = `id@version`.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jaxlora.sampling import MAX_LOGPROBS, MAX_TOP_K

Text = Annotated[str, Field(max_length=1_000_000)]


class _Strict(BaseModel):
    # strict: "8" is not a number and 1 is not a bool; unknown OpenAI fields (user, metadata, ...) are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


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


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[TextPart], Field(max_length=100)] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1000)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

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
