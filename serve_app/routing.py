"""The LoRAModel deployment's request router (Serve's `request_router_config`, set by
`serve_app.config.deployment_options`): each adapter's requests go to the adapter's home replica,
within a bound on its load, and base-model requests to the least loaded replica. The decision is
`serve_app.placement`'s; this is the shim that gives it the request's key and the replicas' loads.

Every DeploymentHandle to LoRAModel runs an instance of its own (the ingress replicas' handles: in Ray
Serve's high-throughput mode on the replica's one event loop). Serve calls it only on that loop, its
completion callbacks from gRPC and Ray threads included, so its count needs no lock. What it reads,
in Ray Serve 2.60 (`ray/serve/_private/router.py`, `AsyncioRouter`):
  - the request: `PendingRequest.args` are the handle call's own arguments (`assign_request` builds the
    PendingRequest from them; they are serialized only when sent to the chosen replica, over gRPC or
    as actor arguments alike). `generate`'s one argument is a `serve_app.wire.Generate`, whose tenant
    and adapter are the key. Nothing is read from `multiplexed_model_id`.
  - the loads: its own count of the requests it placed that have not ended. A request counts from
    the moment it is placed, so requests routed back to back in a burst each see the ones before
    (Serve's queue-length cache counts a request only when its caller's task resumes and sends it,
    after the routing task may have placed several more); Serve tells the router where a request was
    accepted (`on_request_routed`) and, once per dispatched request, when it ended
    (`on_request_completed`); a request whose caller gave up before it was sent is dropped. The count
    knows only this handle's requests: with several ingress replicas, each bounds its own share.
  - full replicas: Serve's queue-length cache (`select_available_replicas`: the count the replica last
    reported with an answer, kept up by this handle's sends and ends) leaves out the replicas at
    their max_ongoing_requests while another can take the request; Serve's rejection protocol still
    turns away a request a replica has no room for, and it is placed again.

Not here: the rule itself (`serve_app.placement`), how a replica serves several adapters in one batch
(the adapter travels in the payload), and Serve's queueing at the handle (max_queued_requests).
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from serve_app.placement import adapter_key, place
from serve_app.wire import Generate

if TYPE_CHECKING:
    from ray.serve.request_router import ReplicaResult  # re-exported there, but not in its public names


def request_key(request: PendingRequest | None) -> str | None:
    """The placement key of a handle call: its `Generate`'s tenant and adapter; None (placed as the base
    model) for any other call, such as `stats`."""
    args = request.args if request is not None else []
    if len(args) == 1 and isinstance(args[0], Generate):
        return adapter_key(args[0].user, args[0].adapter)
    return None


class AdapterHomeRouter(RequestRouter):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._placed: dict[str, tuple[ReplicaID, PendingRequest]] = {}  # internal request id -> where it went

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """One replica: where `placement.place` puts the request among those with room."""
        if pending_request is not None:
            # Without this Serve retries a refused choice at once, with no backoff (its mixins set it too).
            pending_request.routing_context.should_backoff = True
        # All of them when none has room by the cache: Serve then asks the chosen one, and backs off.
        open_replicas = self.select_available_replicas(candidate_replicas) or candidate_replicas
        by_id = {r.replica_id.unique_id: r for r in open_replicas}
        in_flight = self._in_flight()
        chosen = by_id[place(request_key(pending_request), {i: in_flight[r.replica_id] for i, r in by_id.items()})]
        if pending_request is not None:
            self._placed[pending_request.metadata.internal_request_id] = (chosen.replica_id, pending_request)
        return [[chosen]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        self._placed[pending_request.metadata.internal_request_id] = (replica_id, pending_request)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        placed = self._placed.get(internal_request_id)
        # Only where it is now: a refused attempt ends after the request was placed again.
        if placed is not None and placed[0] == replica_id:
            del self._placed[internal_request_id]

    def _in_flight(self) -> collections.Counter[ReplicaID]:
        """Requests placed and not ended, per replica; forgets those whose caller gave up unsent."""
        for request_id, (_, request) in list(self._placed.items()):
            if request.future.cancelled():
                del self._placed[request_id]
        return collections.Counter(replica for replica, _ in self._placed.values())
