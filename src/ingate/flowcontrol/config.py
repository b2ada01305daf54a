"""Flow-control configuration: every default lives here and is documented in docs/flow-control.md."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

FairnessPolicy = Literal["round-robin", "vtc"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class BandConfig(_Model):
    """Capacity and fairness policy of one priority band (all requests with the same priority)."""

    priority: int
    max_requests: int = Field(default=1000, ge=1)
    """Requests queued in the band at most; beyond it new requests get 429."""
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    """Request bytes queued in the band at most."""
    policy: FairnessPolicy | None = None
    """Fairness policy between flows; None = the controller's default_policy."""
    max_in_flight: int | None = Field(default=None, ge=1)
    """Requests of this band dispatched and not yet released, at most (None = no cap). Capping the
    lower bands keeps model-server capacity free for higher ones (a reservation)."""


class SaturationConfig(_Model):
    """When an endpoint counts as saturated: max(waiting/queue_depth, kv/kv_utilization) >= 1."""

    queue_depth_threshold: float = Field(default=5.0, gt=0)
    kv_utilization_threshold: float = Field(default=0.8, gt=0, le=1.0)
    stale_after_s: float = Field(default=0.2, gt=0)
    """Metrics older than this count as saturated (we cannot tell, so we do not pile on)."""


class FlowControlConfig(_Model):
    """Top-level flow-control settings (gateway YAML key ``flowControl``)."""

    enabled: bool = True
    bands: list[BandConfig] = Field(default_factory=list)
    """Explicit bands; a priority without one gets a band with the defaults below."""
    default_band_max_requests: int = Field(default=1000, ge=1)
    default_band_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    flow_max_requests: int = Field(default=200, ge=1)
    """Requests one flow (fairness id) may have queued in one band."""
    flow_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    default_policy: FairnessPolicy = "vtc"
    vtc_input_weight: float = Field(default=1.0, ge=0)
    vtc_output_weight: float = Field(default=2.0, ge=0)
    queue_ttl_s: float = Field(default=30.0, gt=0)
    """A request queued longer than this is answered 503."""
    no_endpoint_ttl_s: float = Field(default=60.0, gt=0)
    """Scale from zero (upstream `noEndpointRequestTTL`): while the pool has no ready endpoint, every
    request (sheddable ones too) waits up to this long for one and is dispatched as soon as one is
    ready; past it, 503 `no_endpoint` with Retry-After."""
    saturation: SaturationConfig = Field(default_factory=SaturationConfig)
    dispatch_headroom: int = Field(default=0, ge=0)
    """Extra requests per endpoint the dispatcher may send beyond the queue-depth threshold."""
    max_in_flight: int | None = Field(default=None, ge=1)
    """Optional hard cap on requests dispatched and not yet released, pool-wide."""
    poll_interval_s: float = Field(default=0.05, gt=0)
    """How often the dispatcher re-reads metrics while requests wait (the scrape interval)."""
    retry_after_s: float = Field(default=1.0, gt=0)
    """Retry-After sent with 429 answers."""
    preemption: bool = False
    """The model servers preempt lower-priority work for higher-priority requests (set
    `pool.modelServerPriority` and start them with priority preemption, e.g. SGLang's
    `--enable-priority-scheduling`, `ingate sim --scheduling-policy priority --priority-preemption`).
    Then, while lower-priority requests are in flight, a request may be dispatched although the pool is
    saturated, as long as requests of its priority and above would not saturate the pool on their own
    (the pool's batch slots, learned from the scraped running counts, plus the queue allowed below
    ``queueDepthThreshold`` per endpoint), and goes to the endpoint where it waits least behind work it
    cannot displace: it takes a lower-priority request's place at once instead of waiting for a
    completion."""

    def band(self, priority: int) -> BandConfig:
        """The configured band for ``priority`` or one built from the defaults."""
        for b in self.bands:
            if b.priority == priority:
                return b
        return BandConfig(
            priority=priority,
            max_requests=self.default_band_max_requests,
            max_bytes=self.default_band_max_bytes,
        )
