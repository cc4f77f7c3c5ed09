"""Fine-tuning jobs as OpenAI's API shows them, kept on the shared filesystem. No Ray here.

    <fs_root>/users/<tenant>/jobs/<job-id>/job.json       the job object (OpenAI's fields + a few of ours)
    <fs_root>/users/<tenant>/jobs/<job-id>/events.jsonl   its events, oldest first
    <fs_root>/users/<tenant>/jobs/<job-id>/checkpoints.jsonl
    <fs_root>/users/<tenant>/jobs/<job-id>/checkpoint/    the trainer's resumable state while it runs

Lifecycle: validating_files -> queued -> running -> succeeded | failed | cancelled. Every change of a
job goes through `JobStore.update`, a read-modify-write under an exclusive lock on the job's folder
with an atomic replace of job.json, so the API (any ingress replica), the controller and the
training task never lose each other's writes. A record on disk is the whole truth: whoever restarts
(an ingress replica, the controller, the whole app) reads the jobs where they are.

`JobRequest` is the POST body (OpenAI's fields and a `lora` extension), `JobSettings` the operator's
bounds and defaults, `train_spec` turns an accepted job into the `TrainSpec` the existing trainer runs,
and `run_job` is what the training task executes. Tenants send data and numbers, never code.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jaxlora.adapter_store import AdapterStore, check_id, file_lock
from jaxlora.errors import DataError, InvalidRequest, JaxLoraError, ResourceNotFound, TenantOverLimit
from jaxlora.model import PROJECTIONS
from training.files import FileStore
from training.spec import LoraSpec, TrainSpec

JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")
FINAL = ("succeeded", "failed", "cancelled")
Auto = Literal["auto"]


# -- what a tenant may ask for ----------------------------------------------------------------------

class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Auto = "auto"
    batch_size: int | Auto = "auto"
    learning_rate_multiplier: float | Auto = "auto"
    beta: float | Auto = "auto"  # DPO only


class MethodParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo"]
    supervised: MethodParams | None = None
    dpo: MethodParams | None = None

    def hyperparameters(self) -> Hyperparameters:
        params = self.supervised if self.type == "supervised" else self.dpo
        return params.hyperparameters if params else Hyperparameters()


class LoraRequest(BaseModel):
    """The extension for LoRA: rank, alpha and which projections (defaults: the engine's rank, 2r, all)."""
    model_config = ConfigDict(extra="forbid")

    r: int | None = Field(None, ge=1)
    alpha: float | None = Field(None, gt=0, le=1024)
    target_modules: list[str] | None = None

    @field_validator("target_modules")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or set(v) - set(PROJECTIONS)):
            raise ValueError(f"target_modules {v} not supported; choose from {list(PROJECTIONS)}")
        return v


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, max_length=40)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None  # OpenAI's older place for them (supervised)
    lora: LoraRequest = Field(default_factory=LoraRequest)
    metadata: dict[str, str] | None = None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("suffix: use letters, digits, '.', '_' and '-', starting with a letter or digit")
        return v

    def resolved_method(self) -> Method:
        if self.method is not None and self.hyperparameters is not None:
            raise InvalidRequest("give hyperparameters inside method, not both", param="hyperparameters")
        if self.method is not None:
            return self.method
        return Method(type="supervised", supervised=MethodParams(hyperparameters=self.hyperparameters or Hyperparameters()))


@dataclasses.dataclass(frozen=True)
class JobSettings:
    """The operator's bounds and defaults (from the app's config): a job cannot ask for more."""
    max_lora_rank: int = 16  # the serving engine's: every result must be servable
    max_epochs: int = 50
    max_batch_size: int = 32
    max_steps: int = 2000  # optimizer steps of one job, whatever its data and epochs
    max_length: int = 256  # tokens per training row
    base_learning_rate: float = 3e-3  # learning_rate_multiplier scales this
    max_learning_rate_multiplier: float = 10.0
    max_running_per_tenant: int = 1
    max_queued_per_tenant: int = 4
    num_cpus: float = 1  # per job's Ray task
    num_gpus: float = 0
    model_dir: str | None = None  # the base checkpoint (None: the default model)
    base_model: str = ""  # its name in the API


# -- the records ------------------------------------------------------------------------------------

def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    tmp.write_text(text)
    os.replace(tmp, path)


class JobStore:
    def __init__(self, fs_root: str | Path):
        self.fs_root = Path(fs_root).resolve()

    def _dir(self, tenant: str) -> Path:
        return self.fs_root / "users" / check_id(tenant, "user id") / "jobs"

    def folder(self, tenant: str, job_id: str) -> Path:
        folder = self._dir(tenant) / job_id if isinstance(job_id, str) and JOB_ID.match(job_id) else None
        if folder is None or not (folder / "job.json").is_file():
            raise ResourceNotFound(f"no such fine-tuning job: {job_id!r}", param="fine_tuning_job_id")
        return folder

    def create(self, tenant: str, record: dict) -> dict:
        job_id = f"ftjob-{secrets.token_hex(12)}"
        record = {"id": job_id, "object": "fine_tuning.job", **record}
        parent = self._dir(tenant)
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".tmp-{job_id}"
        tmp.mkdir()
        (tmp / "job.json").write_text(json.dumps(record))
        (tmp / "events.jsonl").touch()
        os.rename(tmp, parent / job_id)
        return record

    def get(self, tenant: str, job_id: str) -> dict:
        return json.loads((self.folder(tenant, job_id) / "job.json").read_text())

    def update(self, tenant: str, job_id: str, change: Callable[[dict], dict | None]) -> dict:
        """Applies `change` to the job under its lock; `change` returns the new record, or None to
        leave it as it is. Returns the record as it now stands."""
        folder = self.folder(tenant, job_id)
        with file_lock(folder / ".lock"):
            record = json.loads((folder / "job.json").read_text())
            new = change(dict(record))
            if new is None:
                return record
            _atomic_write(folder / "job.json", json.dumps(new))
            return new

    def list(self, tenant: str) -> list[dict]:
        """The tenant's jobs, newest first."""
        parent = self._dir(tenant)
        if not parent.is_dir():
            return []
        jobs = [json.loads((f / "job.json").read_text()) for f in parent.iterdir()
                if JOB_ID.match(f.name) and (f / "job.json").is_file()]
        return sorted(jobs, key=lambda j: (-j["created_at"], j["id"]))

    def tenants(self) -> list[str]:
        users = self.fs_root / "users"
        return sorted(p.name for p in users.iterdir() if (p / "jobs").is_dir()) if users.is_dir() else []

    def add_event(self, tenant: str, job_id: str, message: str, data: dict | None = None, level: str = "info") -> None:
        event = {"id": f"ftevent-{secrets.token_hex(12)}", "object": "fine_tuning.job.event", "created_at": int(time.time()),
                 "level": level, "message": message, "data": data or {}, "type": "metrics" if data else "message"}
        with open(self.folder(tenant, job_id) / "events.jsonl", "a") as f:  # one short append: one line, whole
            f.write(json.dumps(event) + "\n")

    def events(self, tenant: str, job_id: str) -> list[dict]:
        """Newest first, as OpenAI lists them."""
        path = self.folder(tenant, job_id) / "events.jsonl"
        return [json.loads(line) for line in reversed(path.read_text().splitlines()) if line.strip()]

    def add_checkpoint(self, tenant: str, job_id: str, entry: dict) -> None:
        with open(self.folder(tenant, job_id) / "checkpoints.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def checkpoints(self, tenant: str, job_id: str) -> list[dict]:
        path = self.folder(tenant, job_id) / "checkpoints.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        return [json.loads(line) for line in reversed(lines) if line.strip()]


def page(items: list[dict], after: str | None, limit: int) -> dict:
    """OpenAI's cursor pagination over a newest-first list: the items after the one named `after`."""
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


# -- creating a job -----------------------------------------------------------------------------------

def new_job(request: JobRequest, tenant: str, settings: JobSettings, files: FileStore, adapters: AdapterStore,
            jobs: JobStore) -> dict:
    """Checks a job request (files, bounds, the tenant's queue) and records it as `validating_files`."""
    method = request.resolved_method()
    hp = method.hyperparameters()
    for f, param in ((request.training_file, "training_file"), (request.validation_file, "validation_file")):
        if f is not None:
            try:
                files.get(tenant, f)
            except ResourceNotFound:
                raise InvalidRequest(f"{param} {f!r}: no such file", param=param) from None
    parent = None
    if request.model != settings.base_model:
        try:
            resolved = adapters.resolve(tenant, request.model)
        except JaxLoraError:
            raise InvalidRequest(f"model {request.model!r}: not the base model ({settings.base_model}) nor one of "
                                 "your adapters", param="model") from None
        if resolved.owner != f"user:{tenant}":
            raise InvalidRequest(f"model {request.model!r}: only your own adapters can be trained further",
                                 param="model")
        parent = f"{resolved.adapter_id}@{resolved.version}"
    resolved_hp = {
        "n_epochs": _bounded(hp.n_epochs, 3, 1, settings.max_epochs, "n_epochs"),
        "batch_size": _bounded(hp.batch_size, 8, 1, settings.max_batch_size, "batch_size"),
        "learning_rate_multiplier": _bounded(hp.learning_rate_multiplier, 1.0, 1e-3,
                                             settings.max_learning_rate_multiplier, "learning_rate_multiplier"),
    }
    if method.type == "dpo":
        resolved_hp["beta"] = _bounded(hp.beta, 0.1, 1e-3, 10.0, "beta")
    elif hp.beta != "auto":
        raise InvalidRequest("beta is a DPO hyperparameter; this job's method is supervised", param="beta")
    if parent is not None:  # training further: the parent's LoRA shape, which the request may only restate
        lora = _lora_of(resolved.path)
        asked = {k: v for k, v in request.lora.model_dump().items() if v is not None}
        if any((sorted(v) if k == "target_modules" else v) != (sorted(lora[k]) if k == "target_modules" else lora[k])
               for k, v in asked.items()):
            raise InvalidRequest(f"lora {asked} differs from {request.model}'s {lora}; a job that continues an adapter "
                                 "keeps its LoRA shape", param="lora")
    else:
        r = request.lora.r or settings.max_lora_rank
        lora = {"r": r, "alpha": request.lora.alpha or 2.0 * r,
                "target_modules": request.lora.target_modules or list(PROJECTIONS)}
    if lora["r"] > settings.max_lora_rank:
        raise InvalidRequest(f"lora.r={lora['r']} is above the served max_lora_rank {settings.max_lora_rank}",
                             param="lora.r")
    active = [j for j in jobs.list(tenant) if j["status"] in ("validating_files", "queued")]
    if len(active) >= settings.max_queued_per_tenant:
        raise TenantOverLimit(f"you have {len(active)} fine-tuning jobs waiting, the limit is "
                              f"{settings.max_queued_per_tenant}; wait for them or cancel one")
    return jobs.create(tenant, {
        "created_at": int(time.time()), "finished_at": None, "model": request.model, "fine_tuned_model": None,
        "organization_id": tenant, "status": "validating_files", "training_file": request.training_file,
        "validation_file": request.validation_file, "hyperparameters": resolved_hp,
        "method": {"type": method.type, method.type: {"hyperparameters": resolved_hp}}, "result_files": [],
        "trained_tokens": None, "error": None, "seed": request.seed if request.seed is not None else secrets.randbelow(2**31),
        "suffix": request.suffix, "estimated_finish": None, "metadata": request.metadata, "integrations": [],
        "user_provided_suffix": request.suffix, "lora": lora, "parent": parent})


def _lora_of(version_dir: Path) -> dict:
    """r, alpha and target modules of a published PEFT adapter (its adapter_config.json)."""
    from jaxlora.adapter_format import PEFT_CONFIG

    config = json.loads((version_dir / PEFT_CONFIG).read_text())
    return {"r": config["r"], "alpha": float(config["lora_alpha"]), "target_modules": sorted(config["target_modules"])}


def _bounded(value, default, low, high, param: str):
    v = default if value == "auto" else value
    if not low <= v <= high:
        raise InvalidRequest(f"{param}={v} is outside [{low}, {high}]", param=f"hyperparameters.{param}")
    return v


def adapter_id_of(job: dict) -> str:
    """The served name of a job's result: `ft-<suffix>-<8 hex of the job id>`."""
    short = job["id"][-8:]
    return check_id(f"ft-{job['suffix']}-{short}" if job["suffix"] else f"ft-{short}")


def train_spec(job: dict, tenant: str, settings: JobSettings, files: FileStore, fs_root: Path,
               checkpoint_dir: Path, adapters: AdapterStore) -> TrainSpec:
    hp = job["hyperparameters"]
    dpo = job["method"]["type"] == "dpo"
    init = None
    if job["parent"]:
        init = str(adapters.resolve(tenant, job["parent"]).path)
    return TrainSpec(
        user_id=tenant, adapter_id=adapter_id_of(job), data=str(files.path(tenant, job["training_file"])),
        validation_data=str(files.path(tenant, job["validation_file"])) if job["validation_file"] else None,
        fs_root=str(fs_root), model_dir=settings.model_dir, objective="dpo" if dpo else "sft",
        lora=LoraSpec(r=job["lora"]["r"], alpha=job["lora"]["alpha"], target_modules=job["lora"]["target_modules"]),
        init_adapter=init, learning_rate=settings.base_learning_rate * hp["learning_rate_multiplier"],
        epochs=hp["n_epochs"], max_steps=settings.max_steps, batch_size=hp["batch_size"], max_length=settings.max_length,
        dpo_beta=hp.get("beta", 0.1), seed=job["seed"], checkpoint_dir=str(checkpoint_dir), log_every=1,
        checkpoint_every=25, num_gpus=settings.num_gpus)


def validate(job: dict, tenant: str, settings: JobSettings, files: FileStore, tokenizer) -> dict | None:
    """`validating_files` -> `queued`, or `failed` with the error naming the file and its first unusable
    row for this job's method (a file can be valid JSONL, as checked at upload, and still not fit:
    preference rows for DPO, rows within max_length)."""
    from training.data import load_dataset

    objective = "dpo" if job["method"]["type"] == "dpo" else "sft"
    for param in ("training_file", "validation_file"):
        if job[param] is None:
            continue
        try:
            path = files.path(tenant, job[param])
            load_dataset(path, tokenizer, objective, settings.max_length)
        except (DataError, ResourceNotFound) as e:  # the file's path is ours: the tenant knows it by its id
            message = str(e).replace(str(files.fs_root), "").replace(f"/users/{tenant}/files/{job[param]}/content",
                                                                     job[param])
            return job | {"status": "failed", "finished_at": int(time.time()),
                          "error": {"code": "invalid_training_file", "message": message, "param": param}}
    return job | {"status": "queued"}


# -- running one (what the training task executes) ---------------------------------------------------

class Cancelled(Exception):
    pass


def run_job(fs_root: str | Path, tenant: str, job_id: str, settings: JobSettings) -> str:
    """Trains a queued job and publishes its adapter; returns the status it ended in. Every outcome is
    written to the record, by this function, before it returns."""
    from training.trainer import TrainHooks, train_with_hooks  # JAX: only where the job runs

    fs_root = Path(fs_root).resolve()
    jobs, files, adapters = JobStore(fs_root), FileStore(fs_root), AdapterStore(fs_root)
    folder = jobs.folder(tenant, job_id)

    def start(job: dict) -> dict | None:
        if job["status"] != "queued":
            return None
        return job | {"status": "running", "heartbeat_at": time.time()}

    if jobs.update(tenant, job_id, start)["status"] != "running":
        return jobs.get(tenant, job_id)["status"]  # cancelled before it ran
    job = jobs.get(tenant, job_id)
    jobs.add_event(tenant, job_id, "training started" if not job.get("attempts") else "training resumed")
    metrics: list[dict] = []
    t0 = time.time()

    class Hooks(TrainHooks):
        def on_log(self, step: int, total: int, loss: float, tokens_per_s: float, valid_loss: float | None) -> None:
            data = {"step": step, "total_steps": total, "train_loss": loss, "tokens_per_s": tokens_per_s}
            if valid_loss is not None:
                data["valid_loss"] = valid_loss
            metrics.append(data)
            jobs.add_event(tenant, job_id, f"step {step}/{total}: training loss={loss:.4f}", data)
            eta = int(t0 + (time.time() - t0) * total / max(step, 1))
            job_now = jobs.update(tenant, job_id, lambda j: j | {"heartbeat_at": time.time(), "estimated_finish": eta}
                                  if j["status"] == "running" else None)
            if job_now["status"] != "running":
                raise Cancelled()

        def on_checkpoint(self, step: int, loss: float) -> None:
            jobs.add_checkpoint(tenant, job_id, {
                "id": f"ftckpt-{secrets.token_hex(12)}", "object": "fine_tuning.job.checkpoint",
                "created_at": int(time.time()), "fine_tuning_job_id": job_id, "step_number": step,
                "metrics": {"step": step, "train_loss": loss}, "fine_tuned_model_checkpoint": None})

        def before_publish(self) -> None:
            def claim(j: dict) -> dict | None:
                return j | {"publishing": True} if j["status"] == "running" else None

            if not jobs.update(tenant, job_id, claim).get("publishing"):
                raise Cancelled()

    def fail(code: str, message: str, param: str | None) -> str:
        jobs.add_event(tenant, job_id, f"failed: {message}", level="error")
        jobs.update(tenant, job_id, lambda j: j | {"status": "failed", "finished_at": int(time.time()),
                                                   "error": {"code": code, "message": message, "param": param}})
        return "failed"

    try:
        spec = train_spec(job, tenant, settings, files, fs_root, folder / "checkpoint", adapters)
        result = train_with_hooks(spec, Hooks())
    except Cancelled:
        shutil.rmtree(folder / "checkpoint", ignore_errors=True)
        jobs.add_event(tenant, job_id, "cancelled: nothing was published")
        return "cancelled"
    except DataError as e:
        return fail("invalid_training_file", str(e).replace(str(fs_root), "<files>"), _file_param(str(e), job, files, tenant))
    except JaxLoraError as e:
        return fail("invalid_training_job", str(e), None)
    except Exception as e:  # noqa: BLE001 - the record must say it failed; details stay in the task's log
        import logging

        logging.getLogger(__name__).exception("fine-tuning job %s of %s failed", job_id, tenant)
        return fail("training_error", f"training failed: {type(e).__name__}", None)
    result_files = [files.create_result(tenant, "step_metrics.csv", _metrics_csv(metrics)).id]
    png = Path(result.path) / "loss_curve.png"
    if png.is_file():
        result_files.append(files.create_result(tenant, "loss_curve.png", png.read_bytes()).id)
    trained = result.trained_tokens
    jobs.update(tenant, job_id, lambda j: j | {
        "status": "succeeded", "finished_at": int(time.time()), "fine_tuned_model": f"{spec.adapter_id}",
        "result_files": result_files, "trained_tokens": trained, "adapter_version": result.version,
        "estimated_finish": None})
    jobs.add_event(tenant, job_id, f"succeeded: {spec.adapter_id} ({result.version}) is served")
    return "succeeded"


def _file_param(message: str, job: dict, files: FileStore, tenant: str) -> str:
    if job["validation_file"] and str(files.path(tenant, job["validation_file"])) in message:
        return "validation_file"
    return "training_file"


def _metrics_csv(rows: list[dict]) -> bytes:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["step", "train_loss", "valid_loss", "tokens_per_s"])
    for r in rows:
        w.writerow([r["step"], f"{r['train_loss']:.6f}", "" if "valid_loss" not in r else f"{r['valid_loss']:.6f}",
                    f"{r['tokens_per_s']:.1f}"])
    return out.getvalue().encode()


# -- the controller's choice --------------------------------------------------------------------------

def next_to_start(queued: list[tuple[str, dict]], running: dict[str, int], free: int, per_tenant: int) -> list[tuple[str, dict]]:
    """Which queued jobs to start now: up to `free` of them, at most `per_tenant` running per tenant,
    the tenant with the fewest running first (so one tenant's queue never holds another's job back),
    oldest job first within a tenant and between equals."""
    running = dict(running)
    by_tenant: dict[str, list[dict]] = {}
    for tenant, job in sorted(queued, key=lambda tj: (tj[1]["created_at"], tj[1]["id"])):
        by_tenant.setdefault(tenant, []).append(job)
    out = []
    while len(out) < free:
        ready = [t for t, js in by_tenant.items() if js and running.get(t, 0) < per_tenant]
        if not ready:
            break
        tenant = min(ready, key=lambda t: (running.get(t, 0), by_tenant[t][0]["created_at"], by_tenant[t][0]["id"]))
        out.append((tenant, by_tenant[tenant].pop(0)))
        running[tenant] = running.get(tenant, 0) + 1
    return out

