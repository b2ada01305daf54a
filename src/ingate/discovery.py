"""Endpoint discovery sources. Each one writes the same `Datastore`; the core never imports a source.

Static (here): the pool's endpoints listed in the YAML config. A Kubernetes source (InferencePool
selector -> ready pods) writes the datastore the same way through `Datastore.replace_all`.
"""

from __future__ import annotations

from ingate.config import GatewayConfig
from ingate.datastore import Endpoint


def endpoints_from_config(cfg: GatewayConfig) -> list[Endpoint]:
    """The static endpoint source: the pool's endpoints as listed in YAML."""
    out = []
    for i, e in enumerate(cfg.pool.endpoints):
        host, port = e.split()
        out.append(
            Endpoint(
                name=e.name or f"{cfg.pool.name}-{i}",
                host=host,
                port=port,
                engine=e.engine or cfg.pool.engine,
                labels=dict(e.labels),
                weight=e.weight,
            )
        )
    return out
