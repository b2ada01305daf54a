"""What the serving side passes to the Kubernetes adapter: upstream's flags, in one value.

The picker process maps its command line (upstream names: `--pool-name`, `--pool-namespace`,
`--pool-group`, `--endpoint-selector`, `--endpoint-target-ports`, `--ha-enable-leader-election`, as
parsed by `ingate.epp_flags`) to a `KubeOptions` (`from_epp`), then builds the controller and the
elector from it. The pool namespace defaults to the
`NAMESPACE` environment variable (the upstream chart sets it from the downward API), then `default`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kubernetes_asyncio import client

from ingate.datastore import Datastore
from ingate.epp_flags import EppOptions
from ingate.kube.client import api_client
from ingate.kube.controller import KubeDiscovery, required_rules
from ingate.kube.leader import AlwaysLeader, Elector, LeaseElector
from ingate.kube.models import POOL_GROUP, POOL_KINDS, standalone_pool
from ingate.objectives import ObjectiveStore


def lease_name(namespace: str, pool_name: str) -> str:
    """The Lease upstream's picker elects on (`epp-<namespace>-<pool>.llm-d.ai`), so a replica set
    switched between the upstream image and ingate's never has two leaders."""
    return f"epp-{namespace}-{pool_name}.llm-d.ai"


@dataclass
class KubeOptions:
    pool_name: str | None = None
    pool_namespace: str = field(default_factory=lambda: os.environ.get("NAMESPACE") or "default")
    pool_group: str = POOL_GROUP
    endpoint_selector: str | None = None
    endpoint_target_ports: Sequence[int] = ()
    leader_election: bool = False
    """Active-passive (a Lease); False = every replica serves (active-active, or a single replica)."""
    kubeconfig: str | None = None
    """None: in-cluster service account, else $KUBECONFIG / ~/.kube/config."""
    default_engine: str = "vllm"
    lease_duration_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0
    """Leader-election timing (controller-runtime's defaults; ingate's
    `--ingate-leader-election-{lease-duration,renew-deadline,retry-period}` change them)."""

    @classmethod
    def from_epp(cls, epp: EppOptions, kubeconfig: str | None = None) -> KubeOptions:
        """From the upstream picker flags `ingate serve` parsed (`--pool-name`, `--pool-namespace`,
        `--pool-group`, `--endpoint-selector`, `--endpoint-target-ports`, `--ha-enable-leader-election`,
        and ingate's leader-election timing flags)."""
        lease, renew, retry = epp.lease_timings()
        return cls(
            pool_name=str(epp.get("pool-name")) or None,
            pool_namespace=epp.namespace,
            pool_group=str(epp.get("pool-group")),
            endpoint_selector=str(epp.get("endpoint-selector")) or None,
            endpoint_target_ports=tuple(epp.target_ports()),
            leader_election=bool(epp.get("ha-enable-leader-election")),
            kubeconfig=kubeconfig,
            lease_duration_s=lease,
            renew_deadline_s=renew,
            retry_period_s=retry,
        )

    def validate(self) -> None:
        """Raise ValueError naming the flag that is wrong."""
        if (self.pool_name is None) == (self.endpoint_selector is None):
            raise ValueError("either --pool-name or --endpoint-selector must be set (not both)")
        if self.pool_group not in POOL_KINDS:
            raise ValueError(f"--pool-group: expected one of {sorted(POOL_KINDS)}, got {self.pool_group!r}")
        if self.endpoint_selector is not None:
            try:
                standalone_pool(
                    self.pool_namespace, self.endpoint_selector, tuple(self.endpoint_target_ports)
                )
            except ValueError as e:
                raise ValueError(f"--endpoint-selector/--endpoint-target-ports: {e}") from None

    async def connect(self) -> client.ApiClient:
        """One API client (in-cluster or kubeconfig) to share between the controller, the elector and
        the metrics auth; close it at shutdown after stopping them."""
        return await api_client(self.kubeconfig)

    def discovery(
        self, datastore: Datastore, objectives: ObjectiveStore, api: client.ApiClient | None = None
    ) -> KubeDiscovery:
        self.validate()
        return KubeDiscovery(
            datastore,
            objectives,
            self.pool_name,
            self.pool_namespace,
            endpoint_selector=self.endpoint_selector,
            target_ports=self.endpoint_target_ports,
            pool_group=self.pool_group,
            kubeconfig=self.kubeconfig,
            default_engine=self.default_engine,
            api=api,
        )

    def elector(
        self,
        on_started_leading: Callable[[], None] | None = None,
        on_stopped_leading: Callable[[], None] | None = None,
        identity: str | None = None,
        api: client.ApiClient | None = None,
    ) -> Elector:
        if not self.leader_election:
            return AlwaysLeader(on_started_leading)
        # stable across replicas: a digest of the selector (Python's hash() is salted per process)
        name = (
            self.pool_name
            or "selector-" + hashlib.sha256(str(self.endpoint_selector).encode()).hexdigest()[:10]
        )
        return LeaseElector(
            self.pool_namespace,
            lease_name(self.pool_namespace, name),
            identity,
            api=api,
            kubeconfig=self.kubeconfig,
            lease_duration_s=self.lease_duration_s,
            renew_deadline_s=self.renew_deadline_s,
            retry_period_s=self.retry_period_s,
            on_started_leading=on_started_leading,
            on_stopped_leading=on_stopped_leading,
        )

    def rules(self) -> list[dict[str, list[str]]]:
        """The Role these options need."""
        return required_rules(
            self.pool_group,
            leader_election=self.leader_election,
            standalone=self.endpoint_selector is not None,
        )
