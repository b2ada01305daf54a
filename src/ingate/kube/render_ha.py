"""The manifests' part of active-active prefix sharing (`router.epp.prefixSharing`): the config the
picker reads, its UDP container port, and the headless Service whose DNS name lists every replica
(`ingate.prefixshare` resolves it to all their addresses)."""

from __future__ import annotations

from typing import Any

from ingate.kube.values import RenderError


def enabled(epp: dict[str, Any], replicas: int, leader: bool) -> bool:
    """Whether sharing is on; RenderError where it cannot work (not active-active)."""
    if not epp["prefixSharing"]["enabled"]:
        return False
    if replicas <= 1 or leader:
        raise RenderError(
            "router.epp.prefixSharing.enabled needs active-active pickers: router.epp.replicas > 1 and "
            "router.epp.flags.ha-enable-leader-election=false"
        )
    return True


def config(name: str, namespace: str, port: int) -> dict[str, Any]:
    """The ConfigMap's `prefixSharing` section: listen on the port, peers = the headless Service."""
    return {"listen": f"0.0.0.0:{port}", "peers": [f"{name}-peers.{namespace}.svc.cluster.local:{port}"]}


def container_port(port: int) -> dict[str, Any]:
    return {"name": "prefix-share", "containerPort": port, "protocol": "UDP"}


def peers_service(metadata: dict[str, Any], selector: dict[str, str], port: int) -> dict[str, Any]:
    """Headless, and listing pods before they are ready, so a replica learns from the start."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector,
            "ports": [
                {"name": "prefix-share", "protocol": "UDP", "port": port, "targetPort": "prefix-share"}
            ],
        },
    }
