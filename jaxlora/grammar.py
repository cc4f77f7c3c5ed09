"""Constrained decoding: grammars compiled against the tokenizer, and the per-row token masks.

    json_schema_grammar(schema) / json_object_grammar()   a request's grammar (llguidance's source form),
                                                            checked: a keyword it cannot enforce is refused
    GrammarCompiler(tokenizer, vocab_size, eos_ids)        compiles a grammar for this model's vocabulary,
        .matcher(source, timeout_s) -> Matcher             cached by source; too slow to compile: refused
    Matcher                                                one request's place in its grammar
    BatchMasks(vocab_size)                                 the bitmask rows the engine applies on device

The grammar engine is llguidance (a numpy API, no torch; it computes a mask with the GIL released).
A mask is a row of int32 words, bit t of word t // 32 set where token t may come next: 6 KB a row for
a 49152-token vocabulary. The engine (`engine.py`) applies it to the logits before sampling, so the
penalties, temperature and top-k/p only ever see allowed tokens, and the logprobs reported are those
of the masked distribution. EOS is allowed exactly where the grammar accepts; once the grammar is
complete only EOS is.

A row's matcher follows the tokens the row *feeds* (the token it samples next is conditioned on
them): each decode step first consumes the token the row feeds, then computes the mask for the token
it samples. The first token (sampled at the end of prefill) gets the matcher's initial mask. So a
matcher is advanced on the device's schedule, inside the decode call (`engine._generate` calls back
to the host for it), and the multi-step decode call keeps all its steps for constrained rows too.

What it deliberately does not do: know about HTTP or tools (the serving layer turns `response_format`
and `tool_choice` into a schema), or hold which row a matcher is in (the scheduler's).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import threading
import time
from collections.abc import Iterable, Sequence

import numpy as np

from jaxlora.errors import InvalidRequest

# JSON's whitespace, bounded: a row can never spin on spaces, and a newline with indentation fits.
WHITESPACE = r"[ \n]{0,8}"
_JSON_OPTIONS = {"whitespace_pattern": WHITESPACE, "lenient": False}


def _llguidance():
    import llguidance  # imported on first use: serving without grammars never loads it

    return llguidance


def json_schema_grammar(schema: dict, param: str = "response_format") -> str:
    """The grammar of JSON documents valid under `schema`. Refuses (InvalidRequest naming `param`)
    a schema that is not one, or that uses a keyword llguidance cannot enforce (`uniqueItems`, `not`,
    `if`, an unknown `format`, ...): a schema is enforced whole or not at all."""
    if not isinstance(schema, dict):
        raise InvalidRequest(f"invalid {param}: the JSON schema must be an object, got {type(schema).__name__}",
                             param=param)
    ll = _llguidance()
    try:
        grammar = ll.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise InvalidRequest(f"invalid {param}: {e}", param=param) from e
    return checked_grammar(grammar, param)


def checked_grammar(grammar: str, param: str) -> str:
    """`grammar` if llguidance can enforce it, else InvalidRequest naming `param` and what it cannot."""
    is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise InvalidRequest(f"invalid {param}: the schema cannot be enforced: {messages[0]}", param=param)
    return grammar


def json_object_grammar() -> str:
    """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
    return json_schema_grammar({"type": "object"})


@dataclasses.dataclass(eq=False)
class Matcher:
    """One request's place in its grammar. The engine thread (through the decode call's host
    callback) is the only one that advances it."""

    ll: object  # llguidance.LLMatcher
    eos_mask: np.ndarray  # [words] int32: the model's EOS tokens alone (what a finished grammar allows)
    error: str | None = None  # set when the grammar failed mid-generation (resource limits)
    skip_feed: bool = False  # its row's first decode step feeds a prompt token, not one it drew (a forked choice)

    @property
    def done(self) -> bool:
        return self.error is not None or self.ll.is_stopped()

    def fork(self) -> "Matcher":
        """A copy where this one is, for another choice of the same request: its first token is drawn
        in a decode step (`engine.Engine.fork`), whose fed token it does not consume."""
        return Matcher(self.ll.deep_copy(), self.eos_mask, self.error, skip_feed=True)


class GrammarCompiler:
    """Compiles grammars against one model's tokenizer; templates are cached by their source (LRU)
    and each request gets its own copy. Compilation runs on a worker thread (llguidance releases the
    GIL while it builds) and the caller waits at most `timeout_s`: a grammar that takes longer is
    refused, and its source is remembered so a retry is refused at once."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Iterable[int], cache_size: int = 64,
                 workers: int = 2):
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.cache_size = cache_size
        self._templates: collections.OrderedDict[str, object] = collections.OrderedDict()
        self._too_slow: set[str] = set()
        self._lock = threading.Lock()
        self.eos_mask = np.zeros((vocab_size + 31) // 32, np.int32)
        for t in self.eos_token_ids:
            self.eos_mask[t // 32] |= np.array(1 << (t % 32), np.uint32).view(np.int32)
        self._tokenizer = None
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="grammar-compile")
        self.compiles = 0
        self.cache_hits = 0
        self.compile_seconds = 0.0
        self.refused = 0

    def tokenizer(self):
        """llguidance's view of the vocabulary (about a second to build for 50k tokens: once)."""
        with self._lock:
            if self._tokenizer is None:
                from llguidance.hf import from_tokenizer

                self._tokenizer = from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size,
                                                 eos_token=self.eos_token_ids or None)
            return self._tokenizer

    def matcher(self, grammar: str, timeout_s: float = 10.0, param: str = "response_format") -> Matcher:
        """A fresh matcher at the start of `grammar`, or InvalidRequest naming `param`."""
        with self._lock:
            template = self._templates.get(grammar)
            if template is not None:
                self._templates.move_to_end(grammar)
                self.cache_hits += 1
                return Matcher(template.deep_copy(), self.eos_mask)
            if grammar in self._too_slow:
                self.refused += 1
                raise self._slow(timeout_s, param)
        tokenizer = self.tokenizer()
        future = self._pool.submit(self._compile, tokenizer, grammar)
        try:
            template, seconds = future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            with self._lock:
                self._too_slow.add(grammar)
                self.refused += 1
            raise self._slow(timeout_s, param) from None
        with self._lock:
            self.compiles += 1
            self.compile_seconds += seconds
            if template.is_error():
                self.refused += 1
                raise InvalidRequest(f"invalid {param}: {template.get_error()}", param=param)
            self._templates[grammar] = template
            while len(self._templates) > self.cache_size:
                self._templates.popitem(last=False)
        return Matcher(template.deep_copy(), self.eos_mask)

    @staticmethod
    def _compile(tokenizer, grammar: str):
        t0 = time.perf_counter()
        ll = _llguidance()
        template = ll.LLMatcher(tokenizer, grammar, log_level=0, limits=ll.LLParserLimits(verbose_errors=False))
        return template, time.perf_counter() - t0

    @staticmethod
    def _slow(timeout_s: float, param: str) -> InvalidRequest:
        return InvalidRequest(f"invalid {param}: the grammar took longer than {timeout_s:g} s to compile; "
                              "simplify the schema", param=param)

    def stats(self) -> dict:
        return {"compiles": self.compiles, "cache_hits": self.cache_hits, "compile_seconds": self.compile_seconds,
                "refused": self.refused, "cached": len(self._templates)}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class BatchMasks:
    """The bitmask rows [rows, words] of a batch, computed on the host: all ones for a row without a
    grammar, the grammar's allowed tokens for a row with one (EOS alone once it is done)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._executor = None
        self.masks = 0  # rows' masks computed
        self.seconds = 0.0  # time spent computing them (host)

    def _exec(self):
        if self._executor is None:
            self._executor = _llguidance().LLExecutor()
        return self._executor

    def initial(self, matchers: Sequence[Matcher | None]) -> np.ndarray:
        """Masks for each matcher's first token (no token consumed)."""
        return self._fill(matchers)

    def step(self, matchers: Sequence[Matcher | None], fed: np.ndarray) -> np.ndarray:
        """Each row's matcher consumes the token the row feeds (`fed[b]`), then gives the mask for
        the token the row samples."""
        for m, token in zip(matchers, fed):
            if m is not None and m.skip_feed:
                m.skip_feed = False
            elif m is not None and not m.done and not m.ll.consume_token(int(token)):
                m.error = m.ll.get_error() or f"token {int(token)} was not allowed"
        return self._fill(matchers)

    def _fill(self, matchers: Sequence[Matcher | None]) -> np.ndarray:
        t0 = time.perf_counter()
        out = np.full((len(matchers), self.words), -1, np.int32)
        live = []
        for b, m in enumerate(matchers):
            if m is None:
                continue
            if m.done:
                out[b] = m.eos_mask
            else:
                live.append((m.ll, b))
        if live:
            from llguidance.numpy import fill_next_token_bitmask_par

            fill_next_token_bitmask_par(self._exec(), live, out)
            for ll, b in live:
                if ll.is_error():
                    matchers[b].error = ll.get_error()
                    out[b] = matchers[b].eos_mask
            self.masks += len(live)
        self.seconds += time.perf_counter() - t0
        return out
