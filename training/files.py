"""Tenants' files on the shared filesystem, as OpenAI's Files API shows them.

    <fs_root>/users/<tenant>/files/<file-id>/content     the bytes, as uploaded
    <fs_root>/users/<tenant>/files/<file-id>/meta.json   the File object (id, bytes, created_at, filename, purpose)

A file appears whole or not at all: it is written into a hidden folder and renamed into place.
`fine-tune` uploads are checked row by row (`training.data.check_upload`) before anything is kept;
`fine-tune-results` files are what jobs write (their loss curve and metrics). A tenant sees only
its own folder: another tenant's file id is "no such file", exactly as a missing one. No Ray here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from jaxlora.adapter_store import check_id
from jaxlora.errors import InvalidRequest, ResourceNotFound, TenantOverLimit
from training.data import check_upload

PURPOSES = ("fine-tune",)  # what tenants may upload
RESULTS = "fine-tune-results"  # what jobs write
FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")


@dataclasses.dataclass(frozen=True)
class FileLimits:
    max_file_bytes: int = 16 << 20
    max_total_bytes: int = 256 << 20  # per tenant, every file together


@dataclasses.dataclass(frozen=True)
class FileObject:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str

    def to_api(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "status_details": None}


class FileStore:
    def __init__(self, fs_root: str | Path, limits: FileLimits = FileLimits()):
        self.fs_root = Path(fs_root).resolve()
        self.limits = limits

    def _dir(self, tenant: str) -> Path:
        return self.fs_root / "users" / check_id(tenant, "user id") / "files"

    def _folder(self, tenant: str, file_id: str) -> Path:
        folder = self._dir(tenant) / file_id if isinstance(file_id, str) and FILE_ID.match(file_id) else None
        if folder is None or not (folder / "meta.json").is_file():
            raise ResourceNotFound(f"no such file: {file_id!r}", param="file_id")
        return folder

    def create(self, tenant: str, filename: str, purpose: str, data: bytes) -> FileObject:
        """Checks and keeps an upload; InvalidRequest/DataError (400) for a bad one, TenantOverLimit
        (429) past the tenant's total."""
        if purpose not in PURPOSES:
            raise InvalidRequest(f"purpose {purpose!r} is not supported; use one of {list(PURPOSES)}", param="purpose")
        if len(data) > self.limits.max_file_bytes:
            raise InvalidRequest(f"the file has {len(data)} bytes, more than the limit of {self.limits.max_file_bytes}",
                                 param="file")
        check_upload(data)
        return self._write(tenant, filename, purpose, data)

    def create_result(self, tenant: str, filename: str, data: bytes) -> FileObject:
        """A file a job wrote for its tenant (not checked as training data, counted in the total)."""
        return self._write(tenant, filename, RESULTS, data)

    def _write(self, tenant: str, filename: str, purpose: str, data: bytes) -> FileObject:
        used = sum(f.bytes for f in self.list(tenant))
        if used + len(data) > self.limits.max_total_bytes:
            raise TenantOverLimit(f"storing {len(data)} more bytes would take your files past "
                                  f"{self.limits.max_total_bytes} bytes ({used} used); delete files first")
        obj = FileObject(f"file-{secrets.token_hex(12)}", len(data), int(time.time()), os.path.basename(filename) or "file",
                         purpose)
        parent = self._dir(tenant)
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".tmp-{obj.id}"
        tmp.mkdir()
        (tmp / "content").write_bytes(data)
        (tmp / "meta.json").write_text(json.dumps(dataclasses.asdict(obj)))
        os.rename(tmp, parent / obj.id)
        return obj

    def get(self, tenant: str, file_id: str) -> FileObject:
        return FileObject(**json.loads((self._folder(tenant, file_id) / "meta.json").read_text()))

    def path(self, tenant: str, file_id: str) -> Path:
        """Where the bytes of a file are (ResourceNotFound if the tenant has no such file)."""
        return self._folder(tenant, file_id) / "content"

    def list(self, tenant: str, purpose: str | None = None) -> list[FileObject]:
        """The tenant's files, newest first."""
        folder = self._dir(tenant)
        if not folder.is_dir():
            return []
        out = []
        for f in folder.iterdir():
            if FILE_ID.match(f.name) and (f / "meta.json").is_file():
                obj = FileObject(**json.loads((f / "meta.json").read_text()))
                if purpose is None or obj.purpose == purpose:
                    out.append(obj)
        return sorted(out, key=lambda o: (-o.created_at, o.id))

    def delete(self, tenant: str, file_id: str) -> None:
        folder = self._folder(tenant, file_id)
        gone = folder.with_name(f".deleted-{file_id}")
        os.rename(folder, gone)  # atomic: a reader sees the file or no file
        shutil.rmtree(gone, ignore_errors=True)
