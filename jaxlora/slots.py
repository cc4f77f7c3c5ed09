"""Adapter slots on the device, with a host-memory cache behind them.

The device holds one `LoraStack` with `num_slots` slots; slot 0 stays all zeros and means "base
model". Adapters move disk -> host cache (a background thread reads and validates the files, so a
slow or failing read never blocks decoding) -> device slot (a small jitted, donated update). Slots
in use by running rows are pinned by a reference count; when a new adapter needs a slot, the least
recently used unpinned one is evicted. Both caches are keyed by (owner, adapter id, version), so a
new version of an adapter is a different entry and rows on the old version keep their weights.

Thread model: `prefetch` may be called from any thread; `acquire`, `release` and everything that
touches device arrays are called from the one thread that runs the model (the engine loop).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.adapter_format import LoraAdapter
from jaxlora.adapter_store import ResolvedAdapter
from jaxlora.errors import AdapterFormatError, NoFreeSlot
from jaxlora.lora import LoraModule, LoraStack

AdapterKey = tuple[str, str, str]  # (owner, adapter id, version)
BASE_SLOT = 0


@dataclasses.dataclass
class SlotStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    load_failures: int = 0


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_slot(stack: LoraStack, slot: jax.Array, layers: tuple[dict[str, tuple[jax.Array, jax.Array]], ...],
                scale: jax.Array) -> LoraStack:
    new_layers = tuple(
        {m: LoraModule(a=mod.a.at[slot].set(layers[i][m][0]), b=mod.b.at[slot].set(layers[i][m][1]))
         for m, mod in layer.items()}
        for i, layer in enumerate(stack.layers)
    )
    return LoraStack(layers=new_layers, scale=stack.scale.at[slot].set(scale))


def padded_slot_arrays(adapter: LoraAdapter, stack: LoraStack) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], ...]:
    """The adapter's A/B for every (layer, module) of `stack`, zero-padded to the stack's rank;
    modules the adapter does not target are zeros."""
    R = stack.max_rank
    out = []
    for i, layer in enumerate(stack.layers):
        arrays = {}
        for m, mod in layer.items():
            a = np.zeros(mod.a.shape[1:], mod.a.dtype)
            b = np.zeros(mod.b.shape[1:], mod.b.dtype)
            if (i, m) in adapter.weights:
                wa, wb = adapter.weights[(i, m)]
                a[:, : wa.shape[1]] = wa
                b[: wb.shape[0], :] = wb
            arrays[m] = (a, b)
        out.append(arrays)
    untargeted = {m for _, m in adapter.weights} - set(stack.layers[0])
    if untargeted or adapter.r > R:
        raise AdapterFormatError(f"adapter needs modules {sorted(untargeted)} / rank {adapter.r}; the slots hold "
                           f"{sorted(stack.layers[0])} at rank {R}")
    return tuple(out)


class SlotCache:
    def __init__(self, stack: LoraStack, loader: Callable[[ResolvedAdapter], LoraAdapter], host_capacity: int = 64):
        if stack.num_slots < 2:
            raise ValueError("need at least 2 slots: slot 0 is the base model")
        self.stack = stack
        self._loader = loader
        self._host_capacity = host_capacity
        self._host: collections.OrderedDict[AdapterKey, LoraAdapter] = collections.OrderedDict()
        self._pending: dict[AdapterKey, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-load")
        self._slot_of: dict[AdapterKey, int] = {}
        self._key_of: dict[int, AdapterKey] = {}
        self._refs = [0] * stack.num_slots
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # unpinned loaded slots
        self.stats = SlotStats()

    # -- host side (any thread) -------------------------------------------------------------------

    def prefetch(self, adapter: ResolvedAdapter) -> concurrent.futures.Future:
        """Starts reading `adapter` into host memory unless it is there or on its way; the future
        resolves to the weights or raises the load error."""
        key = adapter.key
        with self._lock:
            if key in self._host:
                self._host.move_to_end(key)
                fut: concurrent.futures.Future = concurrent.futures.Future()
                fut.set_result(self._host[key])
                return fut
            if key not in self._pending:
                self._pending[key] = self._pool.submit(self._load, adapter)
            return self._pending[key]

    def _load(self, resolved: ResolvedAdapter) -> LoraAdapter:
        key = resolved.key
        try:
            adapter = self._loader(resolved)
        except BaseException:
            with self._lock:
                self._pending.pop(key, None)
                self.stats.load_failures += 1
            raise
        with self._lock:
            self._pending.pop(key, None)
            self._host[key] = adapter
            self.stats.loads += 1
            while len(self._host) > self._host_capacity:
                self._host.popitem(last=False)
        return adapter

    def forget(self, key: AdapterKey) -> None:
        """Drops `key` from the host cache (e.g. its folder was deleted); device slots age out."""
        with self._lock:
            self._host.pop(key, None)

    # -- device side (the model thread) -----------------------------------------------------------

    def acquire(self, resolved: ResolvedAdapter) -> int:
        """The slot holding `resolved`, loading it (waiting for the host read if needed) into a free
        or evicted slot; pins the slot until `release`. Raises the load error, or NoFreeSlot."""
        key = resolved.key
        slot = self._slot_of.get(key)
        if slot is not None:
            self.stats.hits += 1
        else:
            self.stats.misses += 1
            adapter = self.prefetch(resolved).result()
            slot = self._free_slot()
            self.stack = _write_slot(self.stack, jnp.int32(slot), padded_slot_arrays(adapter, self.stack),
                                     jnp.float32(adapter.scale))
            self._slot_of[key] = slot
            self._key_of[slot] = key
        self._refs[slot] += 1
        self._lru.pop(slot, None)
        return slot

    def can_acquire(self, resolved: ResolvedAdapter, releasing: int | None = None) -> bool:
        """Whether `acquire(resolved)` would find a slot now, or once `releasing` is released."""
        if resolved.key in self._slot_of or len(self._key_of) < self.stack.num_slots - 1 or self._lru:
            return True
        return releasing is not None and releasing != BASE_SLOT and self._refs[releasing] == 1

    def release(self, slot: int) -> None:
        if slot == BASE_SLOT:
            return
        self._refs[slot] -= 1
        if self._refs[slot] == 0:
            self._lru[slot] = None

    def _free_slot(self) -> int:
        for slot in range(1, self.stack.num_slots):
            if slot not in self._key_of:
                return slot
        if not self._lru:
            raise NoFreeSlot(f"all {self.stack.num_slots - 1} adapter slots are in use by running requests")
        slot, _ = self._lru.popitem(last=False)
        del self._slot_of[self._key_of.pop(slot)]
        self.stats.evictions += 1
        return slot

    def warm_up(self) -> None:
        """Compiles the slot write by writing zeros into the last slot (free, and zero, at start)."""
        empty = LoraAdapter(r=1, alpha=1.0, use_rslora=False, weights={})
        last = self.stack.num_slots - 1
        self.stack = _write_slot(self.stack, jnp.int32(last), padded_slot_arrays(empty, self.stack), jnp.float32(0.0))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
