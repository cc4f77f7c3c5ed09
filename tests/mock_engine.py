"""A device engine whose every token can be worked out on paper, for the scheduler's tests
(JetStream's `mock_engine.py` is the model). It implements `scheduler.EngineApi` with numpy:

    first token of a prompt p on adapter slot s:   (sum(p) + 100 * s) % VOCAB
    ... of a choice forked from it with seed e:    (sum(p) + 100 * s + e) % VOCAB (made by a decode step)
    each later token of that row:                  (previous token + 1) % VOCAB
    logprob of a row's n-th token (n from 0):      -n
    top alternatives:                              (token + i, -n - i) for i = 1, 2, ...
    logprob of prompt token t (when asked for):    -t / VOCAB, top alternatives ((t + i) % VOCAB, -(t + i) / VOCAB)

So a base-model request for [3, 4] yields 7, 8, 9, ... with logprobs 0, -1, -2, ... Every device
call is recorded in `calls`, and `gate` (when set) makes each generate call wait for one release,
so a test can hold the loop at a known point (`held` is set while it waits there) and look at it.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from jaxlora.engine import ChunkKV, EngineConfig, PrefillItem, StepTokens
from jaxlora.lora import LoraModule, LoraStack

VOCAB = 1000
TOP = 5


@dataclasses.dataclass
class MockState:
    tokens: np.ndarray  # [B] the token each row produced last
    index: np.ndarray  # [B] how many tokens the row has produced
    slots: np.ndarray  # [B]


def _tokens(token: np.ndarray, index: np.ndarray) -> StepTokens:
    alt = np.arange(1, TOP + 1)
    return StepTokens(token=token.astype(np.int32), logprob=-index.astype(np.float32),
                      top_ids=((token[..., None] + alt) % VOCAB).astype(np.int32),
                      top_logprobs=(-index[..., None] - alt).astype(np.float32))


class MockEngine:
    vocab_size = VOCAB
    kv_cache_bytes = 0

    def __init__(self, config: EngineConfig):
        self.config = config
        self.calls: list[tuple] = []  # ("prefill", prompts, rows) / ("put_chunk", row, start) / ("generate",) / ...
        self.gate: threading.Semaphore | None = None
        self.held = threading.Event()  # set while a generate call waits at the gate
        self.fail_next_generate: BaseException | None = None

    def init_state(self) -> MockState:
        B = self.config.max_batch_size
        return MockState(np.zeros(B, np.int64), np.zeros(B, np.int64), np.zeros(B, np.int64))

    def prefill(self, lora: LoraStack, state: MockState, items: list[PrefillItem]
                ) -> tuple[MockState, StepTokens, ChunkKV, StepTokens]:
        C = self.config.prefill_chunk
        assert len(items) <= self.config.prefill_batch and len({self.config.window(i.start) for i in items}) == 1
        self.calls.append(("prefill", [tuple(i.prompt) for i in items], [i.row for i in items]))
        state = MockState(state.tokens.copy(), state.index.copy(), state.slots.copy())
        first = np.array([(sum(i.prompt) + 100 * i.slot) % VOCAB for i in items])
        for p, i in enumerate(items):
            if i.start + C >= len(i.prompt):  # its last chunk: the row decodes from now on
                state.tokens[i.row], state.index[i.row], state.slots[i.row] = first[p], 1, i.slot
        # each "key" entry is the chunk's start position, so a test can see which chunk a cache hit copied
        written = ChunkKV(k=(np.array([[i.start] for i in items]),), v=(np.zeros((len(items), 1)),))
        padded = [np.array(i.prompt + (0,) * (i.start + C + 1)) for i in items]
        following = np.array([p[i.start + 1: i.start + 1 + C] for p, i in zip(padded, items)])  # [P, C]
        alt = np.arange(1, TOP + 1)
        prompt = StepTokens(token=following, logprob=-following / VOCAB, top_ids=(following[..., None] + alt) % VOCAB,
                            top_logprobs=-(following[..., None] + alt) / VOCAB)
        return state, _tokens(first, np.zeros(len(items), np.int64)), written, prompt

    def fork(self, state: MockState, row: int, prompt: tuple[int, ...], rows: list[int], sampling) -> MockState:
        self.calls.append(("fork", row, tuple(rows)))
        state = MockState(state.tokens.copy(), state.index.copy(), state.slots.copy())
        for r, (_, seed) in zip(rows, sampling):  # its first decode step adds 1 to the token it feeds
            state.tokens[r] = (sum(prompt) + 100 * state.slots[row] + seed - 1) % VOCAB
            state.index[r], state.slots[r] = 0, state.slots[row]
        return state

    def put_chunk(self, state: MockState, kv: ChunkKV, row: int, start: int) -> MockState:
        assert int(kv.k[0][0]) == start, "a cached chunk goes back where it was computed"
        self.calls.append(("put_chunk", row, start))
        return state

    def generate(self, lora: LoraStack, state: MockState) -> tuple[MockState, StepTokens]:
        gate = self.gate
        if gate is not None:
            self.held.set()
            gate.acquire()
            self.held.clear()
        self.calls.append(("generate",))
        if self.fail_next_generate is not None:
            raise self.fail_next_generate
        steps = []
        tokens, index = state.tokens, state.index
        for _ in range(self.config.decode_steps):
            tokens = (tokens + 1) % VOCAB
            steps.append(_tokens(tokens, index))
            index = index + 1
        out = StepTokens(*(np.stack([getattr(s, f.name) for s in steps]) for f in dataclasses.fields(StepTokens)))
        return MockState(tokens, index, state.slots.copy()), out


    def swap_out(self, state: MockState, row: int) -> tuple[int, int]:
        self.calls.append(("swap_out", row))
        return int(state.tokens[row]), int(state.index[row])

    def swap_in(self, saved: tuple[int, int], state: MockState, row: int, slot: int) -> MockState:
        self.calls.append(("swap_in", row, slot))
        state = MockState(state.tokens.copy(), state.index.copy(), state.slots.copy())
        (state.tokens[row], state.index[row]), state.slots[row] = saved, slot
        return state


def tiny_stack(num_slots: int) -> LoraStack:
    """A one-layer, one-module stack: the slot cache's bookkeeping is real, its arrays are tiny."""
    import jax.numpy as jnp

    module = LoraModule(a=jnp.zeros((num_slots, 2, 1)), b=jnp.zeros((num_slots, 1, 2)))
    return LoraStack(layers=({"q_proj": module},), scale=jnp.zeros((num_slots,)))
