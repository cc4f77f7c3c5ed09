"""Tenants' files and fine-tuning jobs on Ray: the JobController deployment, the training task, and
the OpenAI routes the ingress serves (`/v1/files`, `/v1/fine_tuning/jobs`).

Where the state is: every file and job record lives on the shared filesystem (`training.files`,
`training.jobs`), written under a per-job lock. Nothing is held only in memory, so any ingress replica
answers for any job, and stopping the whole application loses nothing.

Who runs jobs: one JobController replica (a deployment of the app, like TenantState; Serve restarts it
if it dies). Every `poll_interval_s` it checks new jobs' files for their method (`validating_files`
-> `queued` or `failed`), then starts queued jobs as Ray tasks within the limits (`max_running_jobs`
in all, `max_running_per_tenant`, the tenant with the fewest running first), with the resources of
the app's config, never the tenant's. Why a deployment holding the tasks, not a detached actor: the
tasks' owner is the controller, so a controller that dies takes its tasks with it (Ray's ownership),
and its successor requeues those jobs once their heartbeat is `heartbeat_timeout_s` old; each
resumes from its last checkpoint. An ingress replica never owns a task: killing one touches no job.

The task (`training_task`) runs `training.jobs.run_job`: the existing trainer, publishing through the
adapter store, writing the job's events, checkpoints and outcome itself. Cancelling is a change of
the record (`cancelled`); the task sees it at its next step and stops without publishing.
"""

from __future__ import annotations

import dataclasses
import email.parser
import email.policy
import logging
import threading
import time

import ray
from fastapi import Request
from fastapi.responses import Response
from ray import serve

from jaxlora.adapter_format import CHAT_TEMPLATE, PEFT_CONFIG, PEFT_WEIGHTS, publish_upload
from jaxlora.adapter_store import AdapterStore, parse_ref
from jaxlora.config import ModelConfig
from jaxlora.errors import InvalidRequest, JaxLoraError, NotPermitted
from jaxlora.hf_checkpoint import model_fingerprint, model_name
from jaxlora.tokenizer import load_tokenizer
from serve_app.config import AppArgs
from serve_app.deployments import base_model_id, model_dir_of
from serve_app.errors import ApiError, api_error_for
from training.files import FileLimits, FileStore
from training.jobs import FINAL, JobRequest, JobSettings, JobStore, new_job, next_to_start, page, validate

log = logging.getLogger("ray.serve")
MAX_ATTEMPTS = 3  # a job whose task keeps dying (out of memory, a lost node) fails after this many tries


def job_settings(a: AppArgs) -> JobSettings:
    f = a.fine_tuning
    return JobSettings(max_lora_rank=a.engine.max_lora_rank, max_epochs=f.max_epochs, max_batch_size=f.max_batch_size,
                       max_steps=f.max_steps, max_length=min(f.max_length, a.engine.max_seq_len),
                       base_learning_rate=f.base_learning_rate, max_running_per_tenant=f.max_running_per_tenant,
                       max_queued_per_tenant=f.max_queued_per_tenant, num_cpus=f.job_num_cpus, num_gpus=f.job_num_gpus,
                       model_dir=str(model_dir_of(a)), base_model=base_model_id(a))


def file_store(a: AppArgs) -> FileStore:
    return FileStore(a.fs_root, FileLimits(a.fine_tuning.max_file_bytes, a.fine_tuning.max_total_file_bytes))


@ray.remote(max_retries=0)
def training_task(fs_root: str, tenant: str, job_id: str, settings: dict) -> str:
    from jaxlora.compile_cache import use_compilation_cache
    from training.jobs import run_job

    use_compilation_cache()
    return run_job(fs_root, tenant, job_id, JobSettings(**settings))


@serve.deployment(name="JobController", num_replicas=1, ray_actor_options={"num_cpus": 0})
class JobController:
    def __init__(self, args: dict):
        a = AppArgs(**args)
        self.args = a.fine_tuning
        self.fs_root = a.fs_root
        self.settings = job_settings(a)
        self.jobs, self.files = JobStore(a.fs_root), file_store(a)
        self.tokenizer = load_tokenizer(model_dir_of(a))
        self.running: dict[tuple[str, str], ray.ObjectRef] = {}
        self._stop = threading.Event()
        threading.Thread(target=self._loop, name="job-controller", daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.wait(self.args.poll_interval_s):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - one bad pass must not end the loop
                log.exception("job controller pass failed")

    def tick(self) -> None:
        self._reap()
        queued, running = [], {}
        for tenant in self.jobs.tenants():
            for job in self.jobs.list(tenant):
                if job["status"] == "validating_files":
                    job = self.jobs.update(tenant, job["id"], lambda j: validate(j, tenant, self.settings, self.files,
                                                                                  self.tokenizer)
                                           if j["status"] == "validating_files" else None)
                if job["status"] == "queued":
                    queued.append((tenant, job))
                elif job["status"] == "running":
                    if (tenant, job["id"]) not in self.running and self._stale(job):
                        self._requeue(tenant, job["id"], "its task stopped reporting (the job controller restarted)")
                    else:
                        running[tenant] = running.get(tenant, 0) + 1
        free = self.args.max_running_jobs - len(self.running)
        for tenant, job in next_to_start(queued, running, max(free, 0), self.args.max_running_per_tenant):
            self.running[(tenant, job["id"])] = training_task.options(
                num_cpus=self.settings.num_cpus, num_gpus=self.settings.num_gpus, name=f"fine-tune:{tenant}/{job['id']}",
            ).remote(self.fs_root, tenant, job["id"], dataclasses.asdict(self.settings))

    def _stale(self, job: dict) -> bool:
        return time.time() - job.get("heartbeat_at", 0) > self.args.heartbeat_timeout_s

    def _reap(self) -> None:
        if not self.running:
            return
        done, _ = ray.wait(list(self.running.values()), num_returns=len(self.running), timeout=0)
        for key in [k for k, ref in self.running.items() if ref in done]:
            ref = self.running.pop(key)
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the worker died (OOM, node lost): run it again, from its checkpoint
                self._requeue(*key, f"its task failed ({type(e).__name__})")

    def _requeue(self, tenant: str, job_id: str, why: str) -> None:
        """Back to `queued`, to resume from its checkpoint; `failed` once it has been tried MAX_ATTEMPTS times."""
        def back(j: dict) -> dict | None:
            if j["status"] != "running" or j.get("publishing"):
                return None
            attempts = j.get("attempts", 0) + 1
            if attempts >= MAX_ATTEMPTS:
                return j | {"status": "failed", "finished_at": int(time.time()), "error": {
                    "code": "training_error", "message": f"training stopped {attempts} times: {why}", "param": None}}
            return j | {"status": "queued", "attempts": attempts}

        status = self.jobs.update(tenant, job_id, back)["status"]
        if status == "queued":
            self.jobs.add_event(tenant, job_id, f"requeued: {why}; it resumes from its last checkpoint", level="warn")
        elif status == "failed":
            self.jobs.add_event(tenant, job_id, f"failed: {why}, {MAX_ATTEMPTS} times", level="error")

    def __del__(self):
        if hasattr(self, "_stop"):
            self._stop.set()


class FineTuningRoutes:
    """The routes, bound to one ingress replica's view of the stores; `tenant(request)` is the
    ingress' authentication (a tenant only ever names its own files and jobs)."""

    def __init__(self, a: AppArgs, tenant):
        self.tenant = tenant
        self.files, self.jobs = file_store(a), JobStore(a.fs_root)
        self.adapters = AdapterStore(a.fs_root, a.registered_adapters, tuple(a.allowed_roots))
        self.settings = job_settings(a)
        model_dir = model_dir_of(a)
        self.model_config, self.max_rank = ModelConfig.from_dir(model_dir), a.engine.max_lora_rank
        self.base = {"name": model_name(model_dir), "fingerprint": model_fingerprint(model_dir)}

    def routes(self) -> list[tuple[str, object, list[str]]]:
        return [("/v1/files", self.create_file, ["POST"]), ("/v1/files", self.list_files, ["GET"]),
                ("/v1/files/{file_id}", self.get_file, ["GET"]), ("/v1/files/{file_id}", self.delete_file, ["DELETE"]),
                ("/v1/files/{file_id}/content", self.file_content, ["GET"]),
                ("/v1/fine_tuning/jobs", self.create_job, ["POST"]), ("/v1/fine_tuning/jobs", self.list_jobs, ["GET"]),
                ("/v1/fine_tuning/jobs/{job_id}", self.get_job, ["GET"]),
                ("/v1/fine_tuning/jobs/{job_id}/cancel", self.cancel_job, ["POST"]),
                ("/v1/fine_tuning/jobs/{job_id}/events", self.job_events, ["GET"]),
                ("/v1/fine_tuning/jobs/{job_id}/checkpoints", self.job_checkpoints, ["GET"]),
                ("/v1/models/{model_id}", self.delete_model, ["DELETE"]),
                ("/v1/models/{model_id}/versions", self.upload_version, ["POST"]),
                ("/v1/models/{model_id}/rollback", self.rollback_model, ["POST"])]

    @staticmethod
    def _call(fn, *args):
        try:
            return fn(*args)
        except JaxLoraError as e:
            raise api_error_for(e) from None

    # -- files ------------------------------------------------------------------------------------

    async def create_file(self, request: Request) -> dict:
        user, _ = self.tenant(request)
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(400, "send the file as multipart/form-data with fields 'file' and 'purpose'", param="file")
        fields = _form_fields(ctype, await request.body())
        if "file" not in fields or fields["file"][0] is None:
            raise ApiError(400, "missing the 'file' field (a file part with a filename)", param="file")
        if "purpose" not in fields:
            raise ApiError(400, "missing the 'purpose' field (fine-tune)", param="purpose")
        unknown = sorted(set(fields) - {"file", "purpose"})
        if unknown:
            raise ApiError(400, f"unsupported form fields {unknown}", param=unknown[0])
        filename, data = fields["file"]
        purpose = fields["purpose"][1].decode("utf-8", "replace")
        return self._call(self.files.create, user, filename, purpose, data).to_api()

    def list_files(self, request: Request, purpose: str | None = None) -> dict:
        user, _ = self.tenant(request)
        return {"object": "list", "data": [f.to_api() for f in self._call(self.files.list, user, purpose)], "has_more": False}

    def get_file(self, file_id: str, request: Request) -> dict:
        user, _ = self.tenant(request)
        return self._call(self.files.get, user, file_id).to_api()

    def file_content(self, file_id: str, request: Request) -> Response:
        user, _ = self.tenant(request)
        path = self._call(self.files.path, user, file_id)
        return Response(path.read_bytes(), media_type="application/octet-stream")

    def delete_file(self, file_id: str, request: Request) -> dict:
        user, _ = self.tenant(request)
        self._call(self.files.delete, user, file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- jobs -------------------------------------------------------------------------------------

    def create_job(self, body: JobRequest, request: Request) -> dict:
        user, _ = self.tenant(request)
        return _public(self._call(new_job, body, user, self.settings, self.files, self.adapters, self.jobs))

    def list_jobs(self, request: Request, after: str | None = None, limit: int = 20) -> dict:
        user, _ = self.tenant(request)
        return page([_public(j) for j in self.jobs.list(user)], after, _limit(limit))

    def get_job(self, job_id: str, request: Request) -> dict:
        user, _ = self.tenant(request)
        return _public(self._call(self.jobs.get, user, job_id))

    def cancel_job(self, job_id: str, request: Request) -> dict:
        """A job that has not finished ends `cancelled` now; a running one's task stops at its next step
        and publishes nothing. A finished job (or one already publishing its result) is refused."""
        user, _ = self.tenant(request)

        def cancel(j: dict) -> dict:
            if j["status"] in FINAL or j.get("publishing"):
                raise InvalidRequest(f"job {job_id} is {'publishing' if j.get('publishing') else j['status']}: "
                                     "it cannot be cancelled any more", param="fine_tuning_job_id")
            return j | {"status": "cancelled", "finished_at": int(time.time())}

        job = self._call(self.jobs.update, user, job_id, cancel)
        self.jobs.add_event(user, job_id, "cancel requested by the user")
        return _public(job)

    def job_events(self, job_id: str, request: Request, after: str | None = None, limit: int = 20) -> dict:
        user, _ = self.tenant(request)
        return page(self._call(self.jobs.events, user, job_id), after, _limit(limit))

    def job_checkpoints(self, job_id: str, request: Request, after: str | None = None, limit: int = 10) -> dict:
        user, _ = self.tenant(request)
        return page(self._call(self.jobs.checkpoints, user, job_id), after, _limit(limit))


    # -- the tenant's adapters (OpenAI's model deletion; upload and rollback are extensions) ----------

    def _own(self, user: str, model_id: str) -> str:
        """The adapter id of `model_id` if it is the tenant's own; NotPermitted for the base model or
        a shared one, AdapterNotFoundError (404) for anything else."""
        adapter_id, pinned = self._call(parse_ref, model_id)
        if model_id == self.settings.base_model:
            raise api_error_for(NotPermitted(f"{model_id} is the base model: it cannot be changed", param="model"))
        if pinned:
            raise ApiError(400, f"name the model ({adapter_id}), not one of its versions", param="model")
        if self._call(self.adapters.resolve, user, adapter_id).owner != f"user:{user}":
            raise _shared(adapter_id)
        return adapter_id

    def delete_model(self, model_id: str, request: Request) -> dict:
        """New requests for it get 404 at once; requests already running finish on their version."""
        user, _ = self.tenant(request)
        self._call(self.adapters.delete, user, self._own(user, model_id))
        return {"id": model_id, "object": "model", "deleted": True}

    def rollback_model(self, model_id: str, body: dict, request: Request) -> dict:
        """`{"version": "v0001"}`: new requests get that version (replicas follow within poll_interval_s)."""
        user, _ = self.tenant(request)
        if set(body) != {"version"} or not isinstance(body["version"], str):
            raise ApiError(400, 'send {"version": "vNNNN"}, one of the model\'s versions', param="version")
        resolved = self._call(self.adapters.set_latest, user, self._own(user, model_id), body["version"])
        return {"id": model_id, "object": "model", "latest_version": resolved.version}

    async def upload_version(self, model_id: str, request: Request) -> dict:
        """A PEFT adapter (multipart: `config` = adapter_config.json, `weights` = adapter_model.safetensors)
        published as the next version of the tenant's `model_id` (made if new), once it is checked
        against the base model."""
        user, _ = self.tenant(request)
        adapter_id, pinned = self._call(parse_ref, model_id)
        if pinned or model_id == self.settings.base_model:
            raise ApiError(400, f"upload to an adapter's name, not {model_id}", param="model")
        try:
            owner = self.adapters.resolve(user, adapter_id).owner
        except JaxLoraError:
            owner = f"user:{user}"  # a new adapter of the tenant's
        if owner != f"user:{user}":
            raise _shared(adapter_id)
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(400, f"send multipart/form-data with 'config' ({PEFT_CONFIG}) and 'weights' ({PEFT_WEIGHTS})")
        fields = _form_fields(ctype, await request.body())
        files = {name: fields[field][1] for field, name in (("config", PEFT_CONFIG), ("weights", PEFT_WEIGHTS),
                                                            ("chat_template", CHAT_TEMPLATE)) if field in fields}
        published = self._call(publish_upload, self.adapters, user, adapter_id, files, self.model_config, self.max_rank,
                               self.base)
        return {"id": adapter_id, "object": "model", "version": published.version}


def _shared(adapter_id: str) -> ApiError:
    return api_error_for(NotPermitted(f"{adapter_id} is a shared adapter: only an operator can change it", param="model"))


PRIVATE = ("lora", "parent", "heartbeat_at", "publishing", "attempts", "adapter_version")


def _public(job: dict) -> dict:
    """The job object as OpenAI shows it, with the LoRA extension under `lora` and its origin."""
    out = {k: v for k, v in job.items() if k not in PRIVATE}
    out["lora"] = job.get("lora")
    out["parent_model_version"] = job.get("parent")
    return out


def _limit(limit: int) -> int:
    if not 1 <= limit <= 100:
        raise ApiError(400, f"limit={limit} is outside [1, 100]", param="limit")
    return limit


def _form_fields(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename or None, bytes) of a multipart/form-data body, parsed by the standard library."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise ApiError(400, "the multipart/form-data body could not be parsed", param="file")
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields
