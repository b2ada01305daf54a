"""Authenticated `/metrics` (upstream `--metrics-endpoint-auth`, on by default): who may scrape.

As the upstream picker (controller-runtime's metrics filter): the scraper's bearer token is checked with
a TokenReview (`authentication.k8s.io/v1`), and the authenticated user's right to `get` the
non-resource URL `/metrics` with a SubjectAccessReview (`authorization.k8s.io/v1`). Answers: 200, 401
(no token, an unknown token, or the review failed), 403 (authenticated, not allowed), 500 (the access
review failed). Results are cached like controller-runtime's delegating authenticator/authorizer
(token 1 min, allow 5 min, deny 30 s), so a Prometheus scraping every few seconds costs the API
server two calls per TTL, and a short API server outage does not break scraping.

RBAC (a ClusterRole, as the upstream chart renders it): `tokenreviews` and `subjectaccessreviews`:
`create`; the scraper's identity needs `get` on the non-resource URL `/metrics`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client

from ingate.kube.client import error_from

log = logging.getLogger("ingate.kube.metrics_auth")

RULES: list[dict[str, list[str]]] = [
    {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
    {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
]
"""The ClusterRole rules the picker needs for this (besides the scraper's own `get /metrics`)."""


@dataclass(frozen=True, slots=True)
class Decision:
    status: int
    """200, 401, 403 or 500."""
    message: str = ""


@dataclass(frozen=True, slots=True)
class _User:
    name: str
    uid: str
    groups: tuple[str, ...]
    extra: tuple[tuple[str, tuple[str, ...]], ...]


class MetricsAuth:
    """Checks a request's `Authorization` header; see the module docstring."""

    def __init__(
        self,
        api: client.ApiClient,
        *,
        authn_ttl_s: float = 60.0,
        allow_ttl_s: float = 300.0,
        deny_ttl_s: float = 30.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._authn: Any = client.AuthenticationV1Api(api)
        self._authz: Any = client.AuthorizationV1Api(api)
        self._authn_ttl, self._allow_ttl, self._deny_ttl = authn_ttl_s, allow_ttl_s, deny_ttl_s
        self._timeout = timeout_s
        self._clock = clock
        self._tokens: dict[str, tuple[float, _User | None]] = {}
        self._access: dict[tuple[_User, str, str], tuple[float, bool, str]] = {}

    async def check(self, authorization: str | None, path: str = "/metrics", verb: str = "get") -> Decision:
        """The decision for a request carrying `authorization` (the header value) to `verb path`."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Decision(401, "Unauthorized")
        try:
            user = await self._authenticate(token.strip())
        except Exception as e:
            log.warning("metrics auth: token review failed: %s", e)
            return Decision(401, "Authentication failed")
        if user is None:
            return Decision(401, "Unauthorized")
        try:
            allowed, reason = await self._authorize(user, path, verb)
        except Exception as e:
            log.warning("metrics auth: access review for %s failed: %s", user.name, e)
            return Decision(500, f"Authorization for user {user.name} failed")
        if not allowed:
            return Decision(
                403, f"Authorization denied for user {user.name}" + (f": {reason}" if reason else "")
            )
        return Decision(200)

    def _trim(self) -> None:
        if len(self._tokens) + len(self._access) > 4096:
            now = self._clock()
            self._tokens = {k: v for k, v in self._tokens.items() if v[0] > now}
            self._access = {k: v for k, v in self._access.items() if v[0] > now}

    async def _authenticate(self, token: str) -> _User | None:
        now = self._clock()
        hit = self._tokens.get(token)
        if hit is not None and hit[0] > now:
            return hit[1]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}
        resp = await self._authn.create_token_review(
            body, _preload_content=False, _request_timeout=self._timeout
        )
        if resp.status not in (200, 201):
            raise await error_from(resp, "create tokenreview")
        st = (await resp.json()).get("status") or {}
        user = None
        if st.get("authenticated"):
            u = st.get("user") or {}
            extra = tuple(sorted((k, tuple(v)) for k, v in (u.get("extra") or {}).items()))
            user = _User(
                str(u.get("username", "")), str(u.get("uid", "")), tuple(u.get("groups") or ()), extra
            )
        self._trim()
        self._tokens[token] = (now + self._authn_ttl, user)
        return user

    async def _authorize(self, user: _User, path: str, verb: str) -> tuple[bool, str]:
        now = self._clock()
        key = (user, path, verb)
        hit = self._access.get(key)
        if hit is not None and hit[0] > now:
            return hit[1], hit[2]
        spec: dict[str, Any] = {
            "user": user.name,
            "groups": list(user.groups),
            "nonResourceAttributes": {"path": path, "verb": verb},
        }
        if user.uid:
            spec["uid"] = user.uid
        if user.extra:
            spec["extra"] = {k: list(v) for k, v in user.extra}
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}
        resp = await self._authz.create_subject_access_review(
            body, _preload_content=False, _request_timeout=self._timeout
        )
        if resp.status not in (200, 201):
            raise await error_from(resp, "create subjectaccessreview")
        st = (await resp.json()).get("status") or {}
        allowed = bool(st.get("allowed")) and not st.get("denied")
        reason = str(st.get("reason", ""))
        self._trim()
        self._access[key] = (now + (self._allow_ttl if allowed else self._deny_ttl), allowed, reason)
        return allowed, reason
