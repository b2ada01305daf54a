"""High availability: several picker replicas, one active (Lease leader election) or all active.

`LeaseElector` implements client-go's leader election on a coordination.k8s.io/v1 Lease, like the
upstream picker (`--ha-enable-leader-election`; lease duration 15 s, renew deadline 10 s, retry period
2 s): a candidate reads the Lease every retry period; it may take it when it is free (no holder, e.g.
released on graceful stop) or when the holder's record has not changed for a whole lease duration, as
timed by the candidate's own clock from when it first saw that record (immune to clock skew between
replicas). Writes carry the resourceVersion read, so two candidates never both win (409 Conflict for
the loser). The leader renews every retry period and steps down when it could not renew for the renew
deadline. `stop()` releases the Lease so a standby takes over at once rather than after a lease duration.

`is_leader` and the callbacks let the serving side report gRPC health SERVING only on the leader
(readiness `service: readiness` with several replicas upstream). `AlwaysLeader` is the active-active
mode: every replica serves, no Lease is touched.

`python -m ingate.kube.leader --kubeconfig F --namespace NS --name LEASE --identity ID` runs one
elector and prints its transitions (used by the tests to kill -9 a leader; handy for checking RBAC).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from kubernetes_asyncio import client

from ingate.kube.client import KubeApiError, api_client, error_from

log = logging.getLogger("ingate.kube.leader")

HAMode = Literal["active-passive", "active-active"]


class Elector(Protocol):
    @property
    def is_leader(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def _micro_time(ts: float | None = None) -> str:
    """metav1.MicroTime, as the API server stores Lease times."""
    return datetime.fromtimestamp(time.time() if ts is None else ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_identity() -> str:
    """The pod name (`POD_NAME` from the downward API, as the chart sets it), else client-go's
    `hostname_<random>` (two processes on one host never share an identity)."""
    pod = os.environ.get("POD_NAME")
    if pod:
        return pod
    return f"{os.environ.get('HOSTNAME') or socket.gethostname()}_{random.getrandbits(32):08x}"


class AlwaysLeader:
    """Active-active: every replica is the leader; no Lease."""

    def __init__(self, on_started_leading: Callable[[], None] | None = None) -> None:
        self._cb = on_started_leading
        self._leader = False

    @property
    def is_leader(self) -> bool:
        return self._leader

    async def start(self) -> None:
        self._leader = True
        if self._cb:
            self._cb()

    async def stop(self) -> None:
        self._leader = False


class LeaseElector:
    """See the module docstring."""

    def __init__(
        self,
        namespace: str,
        name: str,
        identity: str | None = None,
        *,
        api: client.ApiClient | None = None,
        kubeconfig: str | None = None,
        lease_duration_s: float = 15.0,
        renew_deadline_s: float = 10.0,
        retry_period_s: float = 2.0,
        on_started_leading: Callable[[], None] | None = None,
        on_stopped_leading: Callable[[], None] | None = None,
        on_new_leader: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not lease_duration_s > renew_deadline_s > retry_period_s > 0:
            raise ValueError("need lease duration > renew deadline > retry period > 0")
        self.namespace, self.name = namespace, name
        self.identity = identity or default_identity()
        self._api, self._own_api = api, api is None
        self.kubeconfig = kubeconfig
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self.retry_period_s = retry_period_s
        self._on_started, self._on_stopped, self._on_new = (
            on_started_leading,
            on_stopped_leading,
            on_new_leader,
        )
        self._rng = rng or random.Random()
        self._leader = False
        self.leader_identity: str | None = None
        """The holder last observed (None = unknown or free)."""
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._last_renew = 0.0
        self._lease: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self.transitions = 0
        """Times this elector became leader."""

    @property
    def is_leader(self) -> bool:
        return self._leader

    async def start(self) -> None:
        if self._api is None:
            self._api = await api_client(self.kubeconfig)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"lease-{self.name}")

    async def stop(self, release: bool = True) -> None:
        """Stop campaigning; a leader releases the Lease (standbys take over at once) unless
        `release` is False."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._leader and release:
            with contextlib.suppress(Exception):
                await self._release()
        self._set_leader(False)
        if self._own_api and self._api is not None:
            await self._api.close()
            self._api = None

    # ---- loop ------------------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                ok = await self._try_acquire_or_renew()
            except (KubeApiError, OSError, TimeoutError, ValueError) as e:
                log.warning("lease %s/%s: %s", self.namespace, self.name, e)
                ok = False
            except Exception as e:  # e.g. aiohttp.ClientError: the API server is away
                log.warning("lease %s/%s: %s: %s", self.namespace, self.name, type(e).__name__, e)
                ok = False
            now = loop.time()
            if ok:
                self._last_renew = now
                self._set_leader(True)
            elif self._leader and now - self._last_renew >= self.renew_deadline_s:
                log.warning(
                    "lease %s/%s: could not renew for %.1fs; stepping down",
                    self.namespace,
                    self.name,
                    now - self._last_renew,
                )
                self._set_leader(False)
            # leaders renew on the period; candidates add up to 20% jitter (client-go JitterUntil 1.2)
            delay = self.retry_period_s * (1.0 if self._leader else 1.0 + 0.2 * self._rng.random())
            await asyncio.sleep(delay)

    def _set_leader(self, leader: bool) -> None:
        if leader == self._leader:
            return
        self._leader = leader
        if leader:
            self.transitions += 1
            log.info("lease %s/%s: %s is now the leader", self.namespace, self.name, self.identity)
            if self._on_started:
                self._on_started()
        else:
            log.info("lease %s/%s: %s stopped leading", self.namespace, self.name, self.identity)
            if self._on_stopped:
                self._on_stopped()

    # ---- API calls -------------------------------------------------------------------------------

    def _coord(self) -> Any:
        assert self._api is not None
        return client.CoordinationV1Api(self._api)

    async def _read(self) -> dict[str, Any] | None:
        resp = await self._coord().read_namespaced_lease(
            self.name, self.namespace, _preload_content=False, _request_timeout=self.retry_period_s * 2
        )
        if resp.status == 404:
            resp.release()
            return None
        if resp.status != 200:
            raise await error_from(resp, f"get lease {self.name}")
        body: dict[str, Any] = await resp.json()
        return body

    async def _write(self, body: dict[str, Any], create: bool) -> bool:
        coord = self._coord()
        timeout = self.retry_period_s * 2
        if create:
            resp = await coord.create_namespaced_lease(
                self.namespace, body, _preload_content=False, _request_timeout=timeout
            )
        else:
            resp = await coord.replace_namespaced_lease(
                self.name, self.namespace, body, _preload_content=False, _request_timeout=timeout
            )
        if resp.status == 409:  # someone else wrote first
            resp.release()
            return False
        if resp.status not in (200, 201):
            raise await error_from(resp, f"{'create' if create else 'update'} lease {self.name}")
        self._lease = await resp.json()
        return True

    def _spec(self, acquire_time: str, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.lease_duration_s)),
            "acquireTime": acquire_time,
            "renewTime": _micro_time(),
            "leaseTransitions": transitions,
        }

    async def _try_acquire_or_renew(self) -> bool:
        loop = asyncio.get_running_loop()
        cur = await self._read()
        if cur is None:
            body: dict[str, Any] = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(_micro_time(), 0),
            }
            ok = await self._write(body, create=True)
            self._observe(body["spec"] if ok else None, loop.time())
            return ok
        spec = cur.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (
            holder,
            spec.get("renewTime"),
            spec.get("leaseTransitions"),
            spec.get("leaseDurationSeconds"),
        )
        now = loop.time()
        if record != self._observed:
            self._observed, self._observed_at = record, now
            if holder != self.leader_identity:
                self.leader_identity = holder or None
                if holder and self._on_new:
                    self._on_new(holder)
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration_s)
        if holder and holder != self.identity and now < self._observed_at + duration:
            return False  # held by another, and renewed within its lease duration
        mine = holder == self.identity
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine else 1)
        acquire_time = spec.get("acquireTime") if mine else _micro_time()
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": cur["metadata"],  # carries resourceVersion: optimistic concurrency
            "spec": self._spec(str(acquire_time or _micro_time()), transitions),
        }
        ok = await self._write(body, create=False)
        if ok:
            self._observe(body["spec"], now)
        return ok

    def _observe(self, spec: dict[str, Any] | None, now: float) -> None:
        if spec is None:
            return
        self._observed = (
            spec["holderIdentity"],
            spec["renewTime"],
            spec["leaseTransitions"],
            spec["leaseDurationSeconds"],
        )
        self._observed_at = now
        self.leader_identity = spec["holderIdentity"]

    async def _release(self) -> None:
        if self._lease is None:
            return
        cur = await self._read()
        if cur is None or (cur.get("spec") or {}).get("holderIdentity") != self.identity:
            return
        cur["spec"].update({"holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": _micro_time()})
        await self._write(cur, create=False)
        log.info("lease %s/%s: released by %s", self.namespace, self.name, self.identity)


def make_elector(
    mode: HAMode,
    namespace: str,
    name: str,
    *,
    on_started_leading: Callable[[], None] | None = None,
    on_stopped_leading: Callable[[], None] | None = None,
    **kw: Any,
) -> Elector:
    """The elector for `mode` (upstream: active-passive when --ha-enable-leader-election)."""
    if mode == "active-active":
        return AlwaysLeader(on_started_leading)
    return LeaseElector(
        namespace, name, on_started_leading=on_started_leading, on_stopped_leading=on_stopped_leading, **kw
    )


async def _main(args: argparse.Namespace) -> None:
    el = LeaseElector(
        args.namespace,
        args.name,
        args.identity,
        kubeconfig=args.kubeconfig,
        lease_duration_s=args.lease_duration,
        renew_deadline_s=args.renew_deadline,
        retry_period_s=args.retry_period,
        on_started_leading=lambda: print("LEADING", flush=True),
        on_stopped_leading=lambda: print("STOPPED", flush=True),
    )
    await el.start()
    try:
        await asyncio.Event().wait()
    finally:
        await el.stop()


def main() -> None:
    p = argparse.ArgumentParser(description="Run one Lease leader elector and print its transitions.")
    p.add_argument("--kubeconfig")
    p.add_argument("--namespace", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--identity")
    p.add_argument("--lease-duration", type=float, default=15.0)
    p.add_argument("--renew-deadline", type=float, default=10.0)
    p.add_argument("--retry-period", type=float, default=2.0)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(p.parse_args()))


if __name__ == "__main__":
    main()
