"""The messages between the ingress and a LoRAModel replica: frozen dataclasses both sides import.

The ingress sends one `Generate` (whose `user` and `adapter` the model handle's request router also
reads, to choose the replica: `serve_app.routing`); the replica answers with a stream (a Ray streaming
call):
    Started | Failed                    first: accepted, or refused
    PromptLogprobs                      the prompt tokens' logprobs, when asked for, before any Tokens
    Tokens ...                          as the engine produces them, one message per choice and batch
    Done ... | Failed                   one Done per choice, the last ends the stream; or Failed
A streaming item is one message, or a tuple of them where they leave together (a request's last
Tokens with its Done): each item is a Ray streaming call's per-message cost.
`Failed` carries the API error the core error became on the replica (`serve_app.errors.STATUS`);
`Failed.error()` is the one way back to an `ApiError`. Tokens travel as columns of plain numbers, so
a message costs little per token. No HTTP, no OpenAI shapes and no text here: the ingress detokenizes.
"""

from __future__ import annotations

import dataclasses

from jaxlora.requests import PromptLogprobs
from jaxlora.sampling import SamplingParams
from serve_app.errors import ApiError

__all__ = ["AdapterVersion", "Done", "Failed", "Generate", "PromptLogprobs", "Started", "Tokens"]


@dataclasses.dataclass(frozen=True)
class Generate:
    prompt_ids: tuple[int, ...]  # [prompt_len]
    sampling: SamplingParams
    adapter: str | None  # "id" or "id@version" as the client named it; None: the base model
    user: str  # the tenant whose adapters `adapter` is looked up among
    weight: float = 1.0  # the tenant's share under fair scheduling (its tier's weight)
    max_rows: int | None = None  # its tier's row limit; None: the engine's max_rows_per_tenant
    max_queued: int | None = None  # its tier's queue limit; None: the engine's max_queued_per_tenant
    grammar: str | None = None  # what the tokens must follow (llguidance's source form, `jaxlora.grammar`); None: free
    version: str | None = None  # serve this version of `adapter` (a batch's later prompts get its first one's)


@dataclasses.dataclass(frozen=True)
class AdapterVersion:
    id: str
    version: str  # "v0001": the version this request is served by (pinned, or what `latest` named)


@dataclasses.dataclass(frozen=True)
class Started:
    replica: str  # Serve's id of the replica serving the request
    adapter: AdapterVersion | None  # None: the base model


@dataclasses.dataclass(frozen=True)
class Tokens:
    ids: tuple[int, ...]  # [n]
    logprobs: tuple[float, ...]  # [n]
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...]  # [n][k] (token id, logprob), best first
    cached_tokens: int | None = None  # on a request's first Tokens: prompt tokens whose KV came from the prefix cache
    choice: int = 0  # which of the request's `n` choices they belong to


@dataclasses.dataclass(frozen=True)
class Done:
    reason: str  # the engine's finish reason: "stop" or "length" ("cancelled" if the row was freed first)
    completion_tokens: int
    choice: int = 0


@dataclasses.dataclass(frozen=True)
class Failed:
    status: int
    message: str
    type: str
    param: str | None
    code: str | None

    @classmethod
    def of(cls, e: ApiError) -> Failed:
        return cls(e.status, e.message, e.type, e.param, e.code)

    def error(self) -> ApiError:
        return ApiError(self.status, self.message, self.type, self.param, self.code)
