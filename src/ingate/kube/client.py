"""Connecting to the API server, and the errors of raw calls.

The client library is kubernetes_asyncio (pinned in pyproject.toml). Why it over lightkube: it exposes
every list/watch parameter the controller needs as is (resourceVersion, allowWatchBookmarks,
timeoutSeconds, field/label selectors) and hands back the raw streaming response with
`_preload_content=False`, so the controller owns the watch loop (bookmarks, 410 -> relist, backoff)
instead of working around a library-side retry policy; it loads kubeconfig files and the in-cluster
service account the same way client-go does; and it is the asyncio port of the official generated
client, so the wire format is the one every tool uses.
"""

from __future__ import annotations

import json
import os
from typing import Any

from aiohttp import ClientResponse
from kubernetes_asyncio import client, config


class KubeApiError(Exception):
    """A non-2xx answer from the API server (its Status reason and message)."""

    def __init__(self, status: int, reason: str, message: str, what: str = "") -> None:
        super().__init__(f"{what}: {status} {reason}: {message}" if what else f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


class KubeAccessDenied(KubeApiError):
    """401/403: the service account may not do this (fix the Role/RoleBinding); retried slowly."""


async def error_from(resp: ClientResponse, what: str) -> KubeApiError:
    """Read a failed response's Status body into an exception."""
    raw = await resp.read()
    resp.release()
    try:
        st: dict[str, Any] = json.loads(raw)
    except ValueError:
        st = {"message": raw[:200].decode(errors="replace")}
    cls = KubeAccessDenied if resp.status in (401, 403) else KubeApiError
    return cls(resp.status, str(st.get("reason", resp.reason or "")), str(st.get("message", "")), what)


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


async def api_client(
    kubeconfig: str | None = None, context: str | None = None, service_account_dir: str = SERVICE_ACCOUNT_DIR
) -> client.ApiClient:
    """A client from `kubeconfig` when given; else the in-cluster service account when running in a pod
    (KUBERNETES_SERVICE_HOST set: https to the API server, its `token` re-read as kubelet rotates it,
    `ca.crt` verifying the server); else $KUBECONFIG or ~/.kube/config."""
    cfg = client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(
            client_configuration=cfg,
            token_filename=os.path.join(service_account_dir, "token"),
            cert_filename=os.path.join(service_account_dir, "ca.crt"),
        )
    else:
        await config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
    return client.ApiClient(cfg)
