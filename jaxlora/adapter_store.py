"""The adapter store: per-tenant, versioned LoRA adapters on a shared filesystem.

    <fs_root>/users/<user_id>/adapters/<adapter_id>/v0001/ v0002/ latest -> v0002
    <fs_root>/adapters/<adapter_id>/...            shared adapters, readable by every tenant

A request names an adapter as `id` or `id@v0003`. Resolution looks in the tenant's own folder, then
the shared one, then the operator's registry of explicit directories; `latest` wins, else the
newest `v*`. Every name is checked against `ADAPTER_ID` / `VERSION` before it touches a path, and
every resolved path (symlinks followed) must stay inside the folder it was resolved from, so
`../x`, absolute paths, escaping symlinks and other tenants' folders are all unreachable.

Publishing is atomic: files are written into `.tmp-*`, fsynced, renamed to the next free `vNNNN`
(a rename onto an existing version fails, so two publishers get two numbers), then `latest` is
swapped with `os.replace` and the folder fsynced. A version folder never changes once it has its
name, so a reader sees a whole old version or a whole new one.

This module moves files and names; it does not parse weights (see `adapter_format`) or cache them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from jaxlora.errors import AdapterNotFoundError, InvalidAdapterRef

ADAPTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
VERSION = re.compile(r"^v(\d{4,9})$")
MANIFEST = "manifest.json"
LATEST = "latest"
LAST_VERSION = ".last_version"  # left by `delete`: numbering goes on after it, never reuses a version
SHARED = "shared"
REGISTERED = "registered"
DEFAULT_FS_ROOT = "./jaxlora-fs"  # one default for serving, training and the backend
STATIC_VERSION = "static"  # the version label of an operator-registered folder that holds no v* versions
WEIGHT_FILES = ("adapter_model.safetensors", "params.json")


def check_id(value: str, what: str = "adapter id") -> str:
    if not isinstance(value, str) or not ADAPTER_ID.match(value):
        raise InvalidAdapterRef(
            f"invalid {what} {value!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    return value


def parse_ref(ref: str) -> tuple[str, str | None]:
    """`'faq'` -> ('faq', None); `'faq@v0003'` -> ('faq', 'v0003')."""
    name, sep, version = ref.partition("@")
    check_id(name)
    if sep and not VERSION.match(version):
        raise InvalidAdapterRef(f"invalid version {version!r} in {ref!r}: pin a version as <adapter>@v0003")
    return name, (version if sep else None)


def version_number(version: str) -> int:
    return int(VERSION.match(version).group(1))


@dataclasses.dataclass(frozen=True)
class ResolvedAdapter:
    owner: str  # "user:<id>", SHARED or REGISTERED
    adapter_id: str
    version: str  # "v0003", or STATIC_VERSION for a registered folder without versions
    path: Path  # the version folder, symlinks resolved

    @property
    def key(self) -> tuple[str, str, str]:
        """What every cache is keyed by: never the name alone."""
        return (self.owner, self.adapter_id, self.version)

    @property
    def ref(self) -> str:
        return f"{self.adapter_id}@{self.version}"


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str  # as asked for: `id`, or `id@v0002` pinned
    owner: str
    versions: tuple[str, ...]
    latest: str | None
    created: int  # Unix time the version it names (`latest`, or the pinned one) was published


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (created if missing) for the `with` block."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class AdapterStore:
    """Resolves and publishes adapters under `fs_root`.

    `registered` maps adapter ids to operator-chosen folders (`fs_dir` / `cephfs_dir` in the serving
    config); each must lie inside one of `allowed_roots`, and is visible to every tenant.
    """

    def __init__(self, fs_root: str | Path, registered: dict[str, str | Path] | None = None,
                 allowed_roots: tuple[str | Path, ...] = ()):
        self.fs_root = Path(fs_root).resolve()
        self.allowed_roots = tuple(Path(r).resolve() for r in allowed_roots)
        self.registered: dict[str, Path] = {}
        for adapter_id, folder in (registered or {}).items():
            self.register(adapter_id, folder)

    # -- layout -----------------------------------------------------------------------------------

    def tenant_root(self, user_id: str) -> Path:
        return self.fs_root / "users" / check_id(user_id, "user id")

    def adapters_dir(self, user_id: str | None) -> Path:
        """The folder that holds a tenant's adapters (None: the shared ones)."""
        return self.fs_root / "adapters" if user_id is None else self.tenant_root(user_id) / "adapters"

    def register(self, adapter_id: str, folder: str | Path) -> None:
        check_id(adapter_id)
        real = Path(folder).resolve()
        if not any(_inside(real, root) for root in self.allowed_roots):
            roots = ", ".join(map(str, self.allowed_roots)) or "(none configured)"
            raise InvalidAdapterRef(f"registered adapter folder {folder} is outside the allowed roots: {roots}")
        self.registered[adapter_id] = real

    # -- reading ----------------------------------------------------------------------------------

    @staticmethod
    def versions(adapter_dir: Path) -> list[str]:
        """Published versions in `adapter_dir`, oldest first (temporary folders are never listed)."""
        if not adapter_dir.is_dir():
            return []
        return sorted((p.name for p in adapter_dir.iterdir() if VERSION.match(p.name)), key=version_number)

    @staticmethod
    def latest_version(adapter_dir: Path) -> str | None:
        """The target of `latest` if it names a version, else the newest `v*`, else None."""
        with contextlib.suppress(OSError):
            target = os.readlink(adapter_dir / LATEST)
            if VERSION.match(target) and (adapter_dir / target).is_dir():
                return target
        versions = AdapterStore.versions(adapter_dir)
        return versions[-1] if versions else None

    @staticmethod
    def pointer(adapter_dir: Path) -> tuple[str | None, int]:
        """(link target, mtime in ns) of `latest`: what the hot-reload watcher polls."""
        try:
            return os.readlink(adapter_dir / LATEST), os.lstat(adapter_dir / LATEST).st_mtime_ns
        except OSError:
            versions = AdapterStore.versions(adapter_dir)
            return (versions[-1] if versions else None), 0

    def _candidates(self, user_id: str, adapter_id: str) -> Iterator[tuple[str, Path, Path]]:
        """(owner, adapter folder, confinement root) in lookup order."""
        yield f"user:{user_id}", self.adapters_dir(user_id) / adapter_id, self.tenant_root(user_id)
        yield SHARED, self.adapters_dir(None) / adapter_id, self.adapters_dir(None)
        if adapter_id in self.registered:
            folder = self.registered[adapter_id]
            yield REGISTERED, folder, folder

    def resolve(self, user_id: str, ref: str) -> ResolvedAdapter:
        """The version folder `ref` names for `user_id`; AdapterNotFoundError if there is none."""
        adapter_id, pinned = parse_ref(ref)
        check_id(user_id, "user id")
        for owner, folder, root in self._candidates(user_id, adapter_id):
            if not folder.is_dir() and not folder.is_symlink():
                continue
            real_root = root.resolve()
            if not _inside(folder.resolve(), real_root):
                raise InvalidAdapterRef(f"adapter {adapter_id!r} points outside its folder and is refused")
            if owner == REGISTERED and not self.versions(folder):
                if pinned and pinned != STATIC_VERSION:
                    break
                return ResolvedAdapter(owner, adapter_id, STATIC_VERSION, folder.resolve())
            version = pinned or self.latest_version(folder)
            if version is None or not (folder / version).is_dir():
                if pinned:
                    raise AdapterNotFoundError(
                        f"adapter {adapter_id!r} has no version {pinned}; available: {', '.join(self.versions(folder)) or 'none'}"
                    )
                continue
            real = (folder / version).resolve()
            if not _inside(real, real_root):
                raise InvalidAdapterRef(f"adapter {ref!r} points outside its folder and is refused")
            return ResolvedAdapter(owner, adapter_id, version, real)
        raise AdapterNotFoundError(f"adapter {ref!r} does not exist")

    def adapter_dir_of(self, resolved: ResolvedAdapter) -> Path:
        """The folder holding every version of a resolved adapter (what `latest` lives in)."""
        return resolved.path if resolved.version == STATIC_VERSION else resolved.path.parent

    @staticmethod
    def published_at(version_dir: Path) -> int:
        """Unix time a version was published: its manifest's `created_at`, else the folder's mtime."""
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            created = json.loads((version_dir / MANIFEST).read_text())["created_at"]
            return int(datetime.datetime.fromisoformat(created).timestamp())
        with contextlib.suppress(OSError):
            return int(version_dir.stat().st_mtime)
        return 0

    def info(self, user_id: str, ref: str) -> AdapterInfo:
        """What `ref` names for `user_id` (as `list` describes each adapter); AdapterNotFoundError if nothing."""
        resolved = self.resolve(user_id, ref)
        folder = self.adapter_dir_of(resolved)
        versions = tuple(self.versions(folder)) or (resolved.version,)
        return AdapterInfo(ref, resolved.owner, versions, self.latest_version(folder) or resolved.version,
                           self.published_at(resolved.path))

    def list(self, user_id: str) -> list[AdapterInfo]:
        """Every adapter `user_id` may use: its own first, then shared, then registered ones."""
        seen: dict[str, AdapterInfo] = {}
        sources = [(f"user:{user_id}", self.adapters_dir(user_id)), (SHARED, self.adapters_dir(None))]
        for owner, parent in sources:
            if not parent.is_dir():
                continue
            for folder in sorted(parent.iterdir()):
                if ADAPTER_ID.match(folder.name) and folder.name not in seen:
                    versions = self.versions(folder)
                    if versions:
                        latest = self.latest_version(folder)
                        seen[folder.name] = AdapterInfo(folder.name, owner, tuple(versions), latest,
                                                        self.published_at(folder / latest))
        for adapter_id, folder in sorted(self.registered.items()):
            if adapter_id not in seen:
                versions = tuple(self.versions(folder)) or (STATIC_VERSION,)
                latest = self.latest_version(folder) or versions[-1]
                seen[adapter_id] = AdapterInfo(adapter_id, REGISTERED, versions, latest,
                                               self.published_at(folder if latest == STATIC_VERSION else folder / latest))
        return list(seen.values())

    # -- publishing -------------------------------------------------------------------------------

    def _publish_lock(self, adapter_dir: Path):
        """Serialises the number choice and the `latest` swap between publishers on this host and,
        where the filesystem supports it, across hosts; the rename below stays safe without it."""
        return file_lock(adapter_dir / ".publish.lock")

    def publish(
        self,
        user_id: str | None,
        adapter_id: str,
        write_files: Callable[[Path], None],
        base_model: dict | None = None,
        extra_manifest: dict | None = None,
    ) -> ResolvedAdapter:
        """Publishes a new version: `write_files(folder)` writes the adapter files into a fresh
        folder; this adds `manifest.json` and makes the result the new `latest` atomically."""
        check_id(adapter_id)
        adapter_dir = self.adapters_dir(user_id) / adapter_id
        adapter_dir.mkdir(parents=True, exist_ok=True)
        tmp = adapter_dir / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            write_files(tmp)
            weights = [tmp / n for n in WEIGHT_FILES if (tmp / n).is_file()]
            if not weights:
                raise ValueError(f"publish wrote none of {WEIGHT_FILES} into the new version")
            parent = self.latest_version(adapter_dir)
            manifest = {
                "adapter_id": adapter_id,
                "owner": SHARED if user_id is None else f"user:{user_id}",
                "base_model": base_model or {},
                "weights_sha256": {p.name: sha256_of(p) for p in weights},
                "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "parent_version": parent,
                **(extra_manifest or {}),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            for f in tmp.iterdir():
                _fsync(f)
            _fsync(tmp)
            with self._publish_lock(adapter_dir):
                version = self._rename_to_next_version(tmp, adapter_dir)
                link_tmp = adapter_dir / f".latest-{uuid.uuid4().hex}"
                try:
                    os.symlink(version, link_tmp)
                    os.replace(link_tmp, adapter_dir / LATEST)
                finally:
                    if link_tmp.is_symlink():
                        link_tmp.unlink()
                _fsync(adapter_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return ResolvedAdapter(SHARED if user_id is None else f"user:{user_id}", adapter_id, version,
                               (adapter_dir / version).resolve())

    def delete(self, user_id: str | None, adapter_id: str) -> None:
        """Takes an adapter out of serving for new requests: its versions, then `latest`, leave the
        folder (running requests keep the copy their replica already holds). The folder stays with
        the last version's number, so an adapter made again under this name goes on after it: caches
        keyed by version never take its new files for the old ones."""
        check_id(adapter_id)
        adapter_dir = self.adapters_dir(user_id) / adapter_id
        if not self.versions(adapter_dir):
            raise AdapterNotFoundError(f"adapter {adapter_id!r} does not exist")
        trash = adapter_dir / f".deleted-{uuid.uuid4().hex}"
        with self._publish_lock(adapter_dir):
            versions = self.versions(adapter_dir)
            (adapter_dir / LAST_VERSION).write_text(versions[-1])
            trash.mkdir()
            for v in versions:  # first the versions: a dangling `latest` resolves to nothing
                os.rename(adapter_dir / v, trash / v)
            with contextlib.suppress(FileNotFoundError):
                (adapter_dir / LATEST).unlink()
            _fsync(adapter_dir)
        shutil.rmtree(trash, ignore_errors=True)

    def set_latest(self, user_id: str | None, adapter_id: str, version: str) -> ResolvedAdapter:
        """Points `latest` at an existing version (a rollback, or forward again); replicas follow it as
        they follow a publish."""
        check_id(adapter_id)
        adapter_dir = self.adapters_dir(user_id) / adapter_id
        with self._publish_lock(adapter_dir) if adapter_dir.is_dir() else contextlib.nullcontext():
            versions = self.versions(adapter_dir)
            if version not in versions:
                raise AdapterNotFoundError(f"adapter {adapter_id!r} has no version {version}; available: "
                                           f"{', '.join(versions) or 'none'}")
            link_tmp = adapter_dir / f".latest-{uuid.uuid4().hex}"
            os.symlink(version, link_tmp)
            os.replace(link_tmp, adapter_dir / LATEST)
            _fsync(adapter_dir)
        return ResolvedAdapter(SHARED if user_id is None else f"user:{user_id}", adapter_id, version,
                               (adapter_dir / version).resolve())

    def _rename_to_next_version(self, tmp: Path, adapter_dir: Path) -> str:
        existing = self.versions(adapter_dir)
        n = version_number(existing[-1]) + 1 if existing else 1
        with contextlib.suppress(OSError, ValueError, AttributeError):  # no (readable) mark: none left
            n = max(n, version_number((adapter_dir / LAST_VERSION).read_text().strip()) + 1)
        while True:
            version = f"v{n:04d}"
            try:
                # Renaming a folder onto an existing non-empty one fails: a concurrent publisher that
                # took this number first makes us move on to the next.
                if (adapter_dir / version).exists():
                    raise FileExistsError(version)
                os.rename(tmp, adapter_dir / version)
                return version
            except OSError as e:
                if not (adapter_dir / version).exists():
                    raise e
                n += 1
