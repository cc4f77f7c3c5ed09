"""Hot reload: which version of each adapter new requests get, following `latest` on disk.

`AdapterVersions.current(user, ref)` answers from memory for adapters already in use; a background
poller (default every second) checks the `latest` pointer (link target and mtime) of each of them.
When it moves, the new version is read into the host cache in the background and only then becomes
current, so requests never wait for it and a version that fails to load leaves the old one serving
(logged, and counted in `stats.reload_failures`). mtime is only the trigger: the version name is the
identity, because NFS/CephFS mtimes can be coarse or late. Rows already running keep the slot of the
version they started with; the slot cache is keyed by version, so nothing is overwritten under them.

Pinned references (`id@v0003`) bypass all this and resolve straight from the store. When a version
stops being the one new requests get (replaced, or its adapter deleted), `retired` hears of it:
the replica wires it to the prefix cache, which drops that version's KV.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable

from jaxlora.adapter_store import AdapterStore, ResolvedAdapter, parse_ref
from jaxlora.errors import AdapterNotFoundError
from jaxlora.slots import AdapterKey, SlotCache

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ReloadStats:
    polls: int = 0
    reloads: int = 0
    reload_failures: int = 0


@dataclasses.dataclass
class _Tracked:
    current: ResolvedAdapter
    pointer: tuple[str | None, int]  # the `latest` pointer `current` was chosen under
    do_not_retry: tuple[str | None, int] | None = None  # a pointer whose version failed to load: not retried


class AdapterVersions:
    def __init__(self, store: AdapterStore, slots: SlotCache, poll_interval_s: float = 1.0,
                 retired: Callable[[AdapterKey], None] = lambda key: None):
        self.store = store
        self.slots = slots
        self.retired = retired  # told of a version new requests no longer get (the prefix cache drops its KV)
        self.poll_interval_s = poll_interval_s
        self.stats = ReloadStats()
        self._tracked: dict[tuple[str, str], _Tracked] = {}  # (user id, adapter id) -> what new requests get
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def current(self, user_id: str, ref: str) -> ResolvedAdapter:
        """The version a new request for `ref` should use (AdapterNotFoundError if none)."""
        adapter_id, pinned = parse_ref(ref)
        if pinned:
            return self.store.resolve(user_id, ref)
        with self._lock:
            tracked = self._tracked.get((user_id, adapter_id))
        if tracked is not None:
            return tracked.current
        resolved = self.store.resolve(user_id, adapter_id)
        pointer = self.store.pointer(self.store.adapter_dir_of(resolved))
        with self._lock:
            self._tracked.setdefault((user_id, adapter_id), _Tracked(resolved, pointer))
        return resolved

    def poll_once(self) -> None:
        """Checks every tracked adapter's `latest` once; starts loading what moved."""
        self.stats.polls += 1
        with self._lock:
            items = list(self._tracked.items())
        for (user_id, adapter_id), tracked in items:
            adapter_dir = self.store.adapter_dir_of(tracked.current)
            pointer = self.store.pointer(adapter_dir)
            if pointer in (tracked.pointer, tracked.do_not_retry):
                continue
            try:
                new = self.store.resolve(user_id, adapter_id)
            except AdapterNotFoundError:
                log.warning("adapter %s of %s is gone; new requests for it get 404", adapter_id, user_id)
                with self._lock:
                    self._tracked.pop((user_id, adapter_id), None)
                self.slots.forget(tracked.current.key)
                self.retired(tracked.current.key)
                continue
            if new.key == tracked.current.key:
                tracked.pointer = pointer
                continue
            self.slots.prefetch(new).add_done_callback(
                lambda fut, k=(user_id, adapter_id), new=new, pointer=pointer: self._loaded(k, new, pointer, fut)
            )
            tracked.do_not_retry = pointer  # until the load succeeds, do not start it again

    def _loaded(self, k: tuple[str, str], new: ResolvedAdapter, pointer, fut) -> None:
        with self._lock:
            tracked = self._tracked.get(k)
            if tracked is None:
                return
            if fut.exception() is not None:
                self.stats.reload_failures += 1
                log.error("new version %s of adapter %s failed to load; %s keeps serving: %s",
                          new.version, new.adapter_id, tracked.current.version, fut.exception())
                return
            log.info("adapter %s: %s -> %s", new.adapter_id, tracked.current.version, new.version)
            self._tracked[k] = _Tracked(new, pointer)
            self.stats.reloads += 1
        self.retired(tracked.current.key)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="adapter-watcher", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.poll_once()
            except Exception:  # a watcher that dies silently would freeze every adapter at its version
                log.exception("adapter watcher poll failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
