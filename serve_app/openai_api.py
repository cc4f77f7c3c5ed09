"""OpenAI API shapes: request models (validated strictly, so a wrong type is a 400 that names the
field; each becomes the engine's `SamplingParams`, leaving to the engine what the request leaves open)
and one formatter per endpoint for its stream chunks and whole answers. No Ray and no engine here.

Extensions beyond OpenAI's API, as vLLM has them: `top_k`, `min_p`, `repetition_penalty`,
`ignore_eos`; every response also carries `adapter: {"id", "version"}` (null for the base model) and
`system_fingerprint` = `id@version`.

Every field is either honoured or refused with a 400 naming it: a request's unknown fields are refused
(`extra="forbid"`), and a known field is accepted only with the values this server implements
(`best_of` 1, as vLLM V1; no `suffix`). Completions take a batch of prompts (strings or token-id
lists) and `echo` (the prompt before the answer; with `logprobs`, the prompt tokens' own, the first
null; `max_tokens: 0` returns the prompt alone); both endpoints take `n` choices per prompt, in
OpenAI's order (prompt i's choice j has index i * n + j). `response_format` (both endpoints, as
vLLM has it) is enforced by the engine's grammar rows: `json_object`, or `json_schema` whatever its
`strict` (a schema is always enforced whole, and one with a keyword the engine cannot enforce is
refused naming it: a client that asks for JSON output and gets prose would have been lied to).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jaxlora.errors import InvalidRequest
from jaxlora.grammar import json_object_grammar, json_schema_grammar
from jaxlora.tool_calls import CallEvent, ToolCall
from jaxlora.sampling import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_REPETITION_PENALTY, MAX_SEED, MAX_TOP_K, SamplingParams
from serve_app.wire import AdapterVersion

Text = Annotated[str, Field(max_length=1_000_000)]


class _Strict(BaseModel):
    # strict: "8" is not a number and 1 is not a bool; a field this server does not implement is refused
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: the usage so far in every chunk (guidellm asks for it)


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: Annotated[str, Field(max_length=10_000)] | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")  # {} (OpenAI's default): any JSON
    strict: bool | None = None  # enforced whole either way (vLLM's behaviour): strict only makes it a promise


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def grammar(self) -> str | None:
        """The grammar the answer must follow (None: free text); InvalidRequest naming
        `response_format` when the schema cannot be enforced."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return json_object_grammar()
        if self.json_schema is None:
            raise InvalidRequest("invalid response_format: type json_schema needs a json_schema object "
                                 "({\"name\": ..., \"schema\": {...}})", param="response_format")
        return json_schema_grammar(self.json_schema.schema_)


class _SamplingFields(_Strict):
    model: Annotated[str, Field(min_length=1, max_length=200)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1, le=MAX_TOP_K)] = 0  # -1 or 0: off (vLLM uses -1)
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stop: Annotated[str, Field(max_length=1000)] | Annotated[list[Annotated[str, Field(max_length=1000)]], Field(max_length=8)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    n: Annotated[int, Field(ge=1, le=128)] = 1  # and at most the replicas' rows (max_batch_size), checked by the engine
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=MAX_REPETITION_PENALTY)] = 1.0  # vLLM's: prompt and output tokens
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0  # vLLM's
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    response_format: ResponseFormat | None = None

    def check(self) -> None:
        """What field validation cannot see (fields that depend on each other): InvalidRequest naming
        the field."""

    def grammar(self) -> str | None:
        """What the answer must follow, or None (free text)."""
        return None if self.response_format is None else self.response_format.grammar()

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

    def sampling_params(self) -> SamplingParams:
        """The engine's parameters for this request. What the request leaves open stays open (a None
        max_tokens: the engine gives the rest of the context); the engine checks them again."""
        return SamplingParams(
            max_tokens=self.token_limit(), temperature=self.temperature, top_p=self.top_p, top_k=max(0, self.top_k),
            seed=self.seed, ignore_eos=self.ignore_eos, logprobs=self.top_logprob_count(),
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, min_p=self.min_p, logit_bias=self.logit_bias_pairs(), n=self.n,
            prompt_logprobs=self.prompt_logprob_count())

    def token_limit(self) -> int | None:
        """The tokens the engine generates per choice (None: the rest of the context)."""
        return self.max_tokens

    def prompt_logprob_count(self) -> int | None:
        """None: no prompt logprobs; else the alternatives to report beside each prompt token's logprob."""
        return None

    def top_logprob_count(self) -> int | None:
        """None: no logprobs; else the alternatives to report beside each chosen token's logprob."""
        raise NotImplementedError

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=100_000)]


class CompletionRequest(_SamplingFields):
    # one prompt (text or token ids) or a batch of them (the app's max_prompts bounds how many)
    prompt: Text | TokenIds | Annotated[list[Text], Field(min_length=1, max_length=10_000)] \
        | Annotated[list[TokenIds], Field(min_length=1, max_length=10_000)]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # 0: with echo, the prompt alone (vLLM's)
    best_of: int | None = None
    suffix: str | None = None

    def check(self) -> None:
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequest("max_tokens: 0 returns nothing without echo; ask for at least 1 token, or set "
                                 "echo to get the prompt (and its logprobs) alone", param="max_tokens")

    def prompts(self) -> list[str | list[int]]:
        """The batch: each prompt as text or as token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    def prompt_only(self) -> bool:
        """echo with max_tokens 0: each choice is its prompt; the engine's one token is not returned."""
        return self.echo and self.max_tokens == 0

    def token_limit(self) -> int | None:
        return 1 if self.prompt_only() else self.max_tokens

    def top_logprob_count(self) -> int | None:
        return self.logprobs

    def prompt_logprob_count(self) -> int | None:
        return self.logprobs if self.echo else None

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


class FunctionCall(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    arguments: Annotated[str, Field(max_length=1_000_000)]  # JSON text


class ToolCallMessage(_Strict):
    """A call an earlier assistant turn made, as the client sends the history back."""
    id: Annotated[str, Field(min_length=1, max_length=100)]
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[TextPart], Field(max_length=100)] | None = None
    name: str | None = None
    # What the openai client echoes back of an earlier assistant turn; accepted when empty.
    refusal: str | None = None
    tool_calls: Annotated[list[ToolCallMessage], Field(max_length=128)] | None = None
    tool_call_id: Annotated[str, Field(max_length=100)] | None = None  # a tool message: the call it answers
    function_call: None = None
    audio: None = None
    annotations: Annotated[list[Any], Field(max_length=0)] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def for_template(self) -> dict:
        """The message as the tokenizer's chat rendering takes it."""
        out = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionSpec(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    description: Annotated[str, Field(max_length=100_000)] | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments; None: no arguments
    strict: bool | None = None  # enforced whole either way when the grammar forces a call


class ToolSpec(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1000)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: Annotated[list[ToolSpec], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def check(self) -> None:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise InvalidRequest("tools: each function name may appear once", param="tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise InvalidRequest(f"tool_choice names function {self.tool_choice.function.name!r}, which is not "
                                 "among the request's tools", param="tool_choice")
        if self.tool_choice in ("required",) or isinstance(self.tool_choice, NamedToolChoice):
            if not names:
                raise InvalidRequest("tool_choice asks for a call but the request has no tools", param="tool_choice")
        if self.calls_tools() and self.response_format is not None and self.response_format.type != "text":
            raise InvalidRequest("response_format cannot be combined with tools (unless tool_choice is 'none'): "
                                 "give the answer's schema as a tool instead", param="response_format")

    def calls_tools(self) -> bool:
        """Whether the model is offered the tools (tool_choice other than 'none'; OpenAI's default
        with tools is 'auto')."""
        return bool(self.tools) and self.tool_choice != "none"

    def tool_dicts(self) -> list[dict] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.calls_tools() else None

    def forced_tools(self) -> list[dict] | None:
        """The tools one of which the answer must call (tool_choice 'required' or a named one), or None."""
        if not self.calls_tools():
            return None
        if isinstance(self.tool_choice, NamedToolChoice):  # that function, once
            return [t for t in self.tool_dicts() if t["function"]["name"] == self.tool_choice.function.name]
        return self.tool_dicts() if self.tool_choice == "required" else None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def top_logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(_Strict):
    """vLLM's POST /tokenize: a prompt, or chat messages rendered through the model's chat template (an
    adapter's own where it has one)."""
    model: Annotated[str, Field(min_length=1, max_length=200)] | None = None  # None: the base model
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1000)] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (the template has them)
    add_generation_prompt: bool = True
    tools: Annotated[list[ToolSpec], Field(max_length=128)] | None = None
    return_token_strs: bool = False

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequest("give exactly one of prompt or messages", param="prompt")
        if self.tools and self.messages is None:
            raise InvalidRequest("tools go with messages (the chat template renders them)", param="tools")


class DetokenizeRequest(_Strict):
    model: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    tokens: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1_000_000)]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens` (prompt tokens served from the
    prefix cache) once the request is done and the number known."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    return out if cached_tokens is None else out | {"prompt_tokens_details": {"cached_tokens": cached_tokens}}


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One token's logprob with its text: what both APIs' logprobs formats are made of. A prompt's
    first token (echo) has neither logprob nor alternatives (None)."""
    token: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] | None  # the alternatives (their text, logprob), best first
    offset: int  # characters of the choice's text (the echoed prompt's included) before this token


@dataclasses.dataclass
class Choice:
    """One choice of a whole answer."""
    index: int  # OpenAI's order: prompt i's choice j is i * n + j
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    calls: list[ToolCall] = dataclasses.field(default_factory=list)


class _Format:
    """The objects of one response: what a stream's chunks and the whole answer look like. Subclasses
    give the endpoint's object names, its choice shape and its logprobs format."""

    prefix: ClassVar[str]  # of the response id
    chunk_object: ClassVar[str]

    def __init__(self, model: str, adapter: AdapterVersion | None, base_model: str):
        self.id, self.created, self.model = new_id(self.prefix), now(), model
        self.adapter = None if adapter is None else {"id": adapter.id, "version": adapter.version}
        self.fingerprint = base_model if adapter is None else f"{adapter.id}@{adapter.version}"

    def _object(self, object_: str, choices: list[dict], usage: dict | None) -> dict:
        out = {"id": self.id, "object": object_, "created": self.created, "model": self.model, "choices": choices,
               "adapter": self.adapter, "system_fingerprint": self.fingerprint}
        if usage is not None:
            out["usage"] = usage
        return out

    def first_chunk(self, index: int) -> dict | None:
        """What a stream opens choice `index` with before any token, if anything."""
        return None

    def usage_chunk(self, usage: dict) -> dict:
        """A stream's last chunk when `stream_options.include_usage` asks for it: no choices, the usage."""
        return self._object(self.chunk_object, [], usage)


class CompletionFormat(_Format):
    """/v1/completions: `text_completion` objects, legacy logprobs (columns of tokens and offsets)."""

    prefix, chunk_object = "cmpl", "text_completion"

    def chunk(self, index: int, text: str, logprobs: Sequence[TokenLogprob] | None, finish: str | None,
              usage: dict | None = None, calls: Sequence = ()) -> dict:
        """A chunk of choice `index` (no tools on this endpoint)."""
        return self._object(self.chunk_object, [self._choice(Choice(index, text, logprobs, finish))], usage)

    def final(self, choices: Sequence[Choice], usage: dict) -> dict:
        """The whole answer: the same shape as a chunk, with every choice."""
        return self._object(self.chunk_object, [self._choice(c) for c in choices], usage)

    @staticmethod
    def _choice(c: Choice) -> dict:
        return {"index": c.index, "text": c.text, "logprobs": _completion_logprobs(c.logprobs), "finish_reason": c.finish_reason}


class ChatFormat(_Format):
    """/v1/chat/completions: `chat.completion.chunk` deltas (the first names the role) and a
    `chat.completion` message; logprobs as `content` entries with their UTF-8 bytes."""

    prefix, chunk_object = "chatcmpl", "chat.completion.chunk"

    def first_chunk(self, index: int) -> dict:
        return self._choice_chunk(index, {"role": "assistant", "content": ""}, None, None)

    def chunk(self, index: int, text: str, logprobs: Sequence[TokenLogprob] | None, finish: str | None,
              usage: dict | None = None, calls: Sequence[CallEvent] = ()) -> dict:
        """A delta: content text, and tool-call deltas (a call's index, id and name first, then its
        arguments, OpenAI's order)."""
        delta = {"content": text} if text else {}
        if calls:
            delta["tool_calls"] = [
                {"index": e.index, "id": e.call.id, "type": "function", "function": {"name": e.call.name, "arguments": ""}}
                if e.call is not None else {"index": e.index, "function": {"arguments": e.arguments}} for e in calls]
        return self._choice_chunk(index, delta, _chat_logprobs(logprobs), finish, usage)

    def final(self, choices: Sequence[Choice], usage: dict) -> dict:
        return self._object("chat.completion", [self._choice(c) for c in choices], usage)

    @staticmethod
    def _choice(c: Choice) -> dict:
        message = {"role": "assistant", "content": c.text or (None if c.calls else c.text)}
        if c.calls:
            message["tool_calls"] = [{"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}
                                     for t in c.calls]
        return {"index": c.index, "logprobs": _chat_logprobs(c.logprobs), "finish_reason": c.finish_reason, "message": message}

    def _choice_chunk(self, index: int, delta: dict, logprobs: dict | None, finish: str | None,
                      usage: dict | None = None) -> dict:
        return self._object(self.chunk_object, [{"index": index, "delta": delta, "logprobs": logprobs,
                                                 "finish_reason": finish}], usage)


def _completion_logprobs(logprobs: Sequence[TokenLogprob] | None) -> dict | None:
    """OpenAI's legacy columns. Each token's `top_logprobs` holds the alternatives asked for and the
    token itself (OpenAI: "up to logprobs + 1 elements"); an echoed prompt's first token has null."""
    if logprobs is None:
        return None

    def top(t: TokenLogprob) -> dict | None:
        if t.top is None:
            return None
        out = dict(t.top)
        out.setdefault(t.token, t.logprob)
        return out

    return {"tokens": [t.token for t in logprobs], "token_logprobs": [t.logprob for t in logprobs],
            "top_logprobs": [top(t) for t in logprobs], "text_offset": [t.offset for t in logprobs]}


def _chat_logprobs(logprobs: Sequence[TokenLogprob] | None) -> dict | None:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "replace"))}

    if logprobs is None:
        return None
    return {"content": [entry(t.token, t.logprob) | {"top_logprobs": [entry(*alt) for alt in t.top]} for t in logprobs]}
