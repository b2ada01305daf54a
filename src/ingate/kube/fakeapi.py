"""An in-process fake Kubernetes API server that speaks the real REST + watch wire protocol.

No kube-apiserver runs on the machines ingate is developed and tested on, so the controller is tested
against this: an aiohttp server serving the real paths for the resources the endpoint picker uses
(pods, events, leases, InferencePools, InferenceObjectives, InferenceModelRewrites of both API
generations), driven through the real client library (kubernetes_asyncio) and a real kubeconfig. It is
also useful for users' own tests of code that talks to the picker's resources.

What it implements, as the API server does:
- list (`GET .../{plural}`) with `labelSelector` (equality, set-based `in`/`notin`, existence), `fieldSelector`
  `metadata.name=`, `metadata.resourceVersion` on the list; `resourceVersion` older than the compacted
  revision -> 410 Gone (Status reason Expired);
- watch (`?watch=true&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=S`): a chunked stream
  of JSON lines `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}`; events after N are
  replayed from history; N older than the compacted revision -> an ERROR event carrying a 410 Status;
  objects moving in/out of a label selector arrive as ADDED/DELETED like the watch cache sends them;
- get/create/update/delete with a global increasing `metadata.resourceVersion`, 409 Conflict on an
  update with a stale resourceVersion, 409 AlreadyExists, 404 NotFound Status bodies;
- RBAC: built from Role-like rules (apiGroups, resources, verbs, optional resourceNames); anything else
  gets a 403 Forbidden Status, and every request is recorded (`requests`) so tests can assert exactly
  which verbs a client used; an optional bearer token (401 otherwise).

Test controls: `apply`/`delete` (a "kubectl" that bypasses RBAC), `compact()` (history older than now
becomes 410), `expire_watches()` (open watches get an ERROR 410 and close), `stop()`/`start()` on the
same port (the API server going away and coming back with its state, like etcd keeps it).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import ssl
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from ingate.kube.selectors import parse_selector, selector_matches

# (group, version, plural) -> kind. "" is the core group.
DEFAULT_RESOURCES: dict[tuple[str, str, str], str] = {
    ("", "v1", "pods"): "Pod",
    ("", "v1", "events"): "Event",
    ("events.k8s.io", "v1", "events"): "Event",
    ("coordination.k8s.io", "v1", "leases"): "Lease",
    ("inference.networking.k8s.io", "v1", "inferencepools"): "InferencePool",
    ("inference.networking.x-k8s.io", "v1alpha2", "inferencepools"): "InferencePool",
    ("inference.networking.x-k8s.io", "v1alpha2", "inferenceobjectives"): "InferenceObjective",
    ("inference.networking.x-k8s.io", "v1alpha2", "inferencemodelrewrites"): "InferenceModelRewrite",
    ("llm-d.ai", "v1alpha2", "inferenceobjectives"): "InferenceObjective",
    ("llm-d.ai", "v1alpha2", "inferencemodelrewrites"): "InferenceModelRewrite",
}

Rule = dict[str, list[str]]
"""A Role rule: {"apiGroups": [...], "resources": [...], "verbs": [...], "resourceNames": [...]}."""


def status_body(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    """A metav1.Status, the body of every API error (and of an ERROR watch event)."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code,
    }


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_bool(v: str) -> bool:
    """Go's strconv.ParseBool true values (the API server parses query booleans with it)."""
    return v in ("1", "t", "T", "true", "TRUE", "True")


@dataclass
class _Filter:
    namespace: str
    labels: str = ""
    name: str | None = None

    def matches(self, obj: dict[str, Any] | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        if meta.get("namespace") != self.namespace:
            return False
        if self.name is not None and meta.get("name") != self.name:
            return False
        return selector_matches(self.labels, meta.get("labels") or {})


@dataclass
class _Change:
    rv: int
    res: tuple[str, str, str]
    type: str
    obj: dict[str, Any]
    prev: dict[str, Any] | None


@dataclass(eq=False)
class _Watcher:
    res: tuple[str, str, str]
    flt: _Filter
    queue: asyncio.Queue[_Change | str] = field(default_factory=asyncio.Queue)


@dataclass(frozen=True)
class RecordedRequest:
    verb: str
    group: str
    resource: str
    namespace: str
    name: str
    allowed: bool


class FakeApiServer:
    """See the module docstring. `rules=None` allows everything."""

    def __init__(
        self,
        rules: list[Rule] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = "fake-token",
        user: str = "system:serviceaccount:default:ingate",
        bookmark_interval: float = 1.0,
        resources: dict[tuple[str, str, str], str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.rules = rules
        self.host, self.port = host, port
        self.token, self.user = token, user
        self.bookmark_interval = bookmark_interval
        self.ssl_context = ssl_context
        self.resources = dict(resources or DEFAULT_RESOURCES)
        self.objects: dict[tuple[tuple[str, str, str], str, str], dict[str, Any]] = {}
        self.rv = 1
        self.compacted_rv = 0
        self.history: list[_Change] = []
        self.requests: list[RecordedRequest] = []
        self._watchers: set[_Watcher] = set()
        self._runner: web.AppRunner | None = None
        self.users: dict[str, dict[str, Any]] = {}
        """Bearer tokens TokenReview knows: token -> {"username", "uid", "groups"} (`add_user`)."""
        self.nonresource_grants: set[tuple[str, str, str]] = set()
        """(user or group, path, verb) SubjectAccessReview allows (`grant_nonresource`)."""

    # ---- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"

    async def start(self) -> None:
        """Serve (again) on `port`; the first start picks a free port when port is 0."""
        app = web.Application()
        app.router.add_route("*", "/api/{version}/namespaces/{ns}/{plural}", self._collection)
        app.router.add_route("*", "/api/{version}/namespaces/{ns}/{plural}/{name}", self._item)
        app.router.add_route("*", "/apis/{group}/{version}/namespaces/{ns}/{plural}", self._collection)
        app.router.add_route("*", "/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}", self._item)
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self._token_review)
        app.router.add_post("/apis/authorization.k8s.io/v1/subjectaccessreviews", self._access_review)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.host, self.port, reuse_address=True, ssl_context=self.ssl_context
        )
        await site.start()
        if self.port == 0:
            sock = site._server.sockets[0]  # type: ignore[union-attr]
            self.port = sock.getsockname()[1]

    async def stop(self) -> None:
        """The API server goes away: open watches are cut (connection reset), the port closes."""
        for w in list(self._watchers):
            w.queue.put_nowait("abort")
        await asyncio.sleep(0)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig (YAML is a superset of JSON) pointing at this server with its token."""
        user: dict[str, Any] = {"token": self.token} if self.token else {}
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "ingate", "user": user}],
            "contexts": [
                {"name": "fake", "context": {"cluster": "fake", "user": "ingate", "namespace": namespace}}
            ],
            "current-context": "fake",
        }
        path.write_text(json.dumps(cfg, indent=2))
        return path

    # ---- test controls ("kubectl") ---------------------------------------------------------------

    def _res_of(self, obj: dict[str, Any]) -> tuple[str, str, str]:
        api_version = obj["apiVersion"]
        group, version = api_version.split("/", 1) if "/" in api_version else ("", api_version)
        for res, kind in self.resources.items():
            if res[0] == group and res[1] == version and kind == obj["kind"]:
                return res
        raise KeyError(f"resource not served: {api_version} {obj['kind']}")

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace `obj` (needs apiVersion, kind, metadata.name/namespace); bypasses RBAC."""
        obj = copy.deepcopy(obj)
        res = self._res_of(obj)
        meta = obj["metadata"]
        key = (res, meta["namespace"], meta["name"])
        prev = self.objects.get(key)
        if prev is not None:
            meta.setdefault("uid", prev["metadata"]["uid"])
            meta.setdefault("creationTimestamp", prev["metadata"]["creationTimestamp"])
        return self._store(res, obj, prev)

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        res = self._res_of({"apiVersion": api_version, "kind": kind})
        self._delete(res, namespace, name)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        res = self._res_of({"apiVersion": api_version, "kind": kind})
        obj = self.objects.get((res, namespace, name))
        return copy.deepcopy(obj) if obj else None

    def list(self, api_version: str, kind: str, namespace: str) -> list[dict[str, Any]]:
        res = self._res_of({"apiVersion": api_version, "kind": kind})
        return [copy.deepcopy(o) for (r, ns, _), o in self.objects.items() if r == res and ns == namespace]

    def compact(self) -> None:
        """Forget history: any resourceVersion older than now is 410 Gone (as after etcd compaction)."""
        self.compacted_rv = self.rv
        self.history.clear()

    def expire_watches(self) -> None:
        """Compact, then send every open watch an ERROR event with a 410 Expired Status and close it."""
        self.compact()
        for w in list(self._watchers):
            w.queue.put_nowait("expire")

    def add_user(self, token: str, username: str, groups: Iterable[str] = ()) -> None:
        """A token TokenReview authenticates as `username` (e.g. Prometheus' service account)."""
        self.users[token] = {"username": username, "uid": str(uuid.uuid4()), "groups": [*groups]}

    def grant_nonresource(self, subject: str, path: str = "/metrics", verb: str = "get") -> None:
        """Let a user or group `verb` a non-resource URL (a ClusterRole `nonResourceURLs` rule)."""
        self.nonresource_grants.add((subject, path, verb))

    def watch_count(self) -> int:
        return len(self._watchers)

    # ---- storage ---------------------------------------------------------------------------------

    def _store(
        self, res: tuple[str, str, str], obj: dict[str, Any], prev: dict[str, Any] | None
    ) -> dict[str, Any]:
        self.rv += 1
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self.rv)
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        meta["generation"] = (prev or {}).get("metadata", {}).get("generation", 0) + (
            1 if prev is None or prev.get("spec") != obj.get("spec") else 0
        )
        group, version, _ = res
        obj["apiVersion"] = f"{group}/{version}" if group else version
        obj["kind"] = self.resources[res]
        self.objects[(res, meta["namespace"], meta["name"])] = obj
        self._emit(_Change(self.rv, res, "MODIFIED" if prev else "ADDED", obj, prev))
        return obj

    def _delete(self, res: tuple[str, str, str], namespace: str, name: str) -> dict[str, Any] | None:
        prev = self.objects.pop((res, namespace, name), None)
        if prev is None:
            return None
        self.rv += 1
        gone = copy.deepcopy(prev)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self._emit(_Change(self.rv, res, "DELETED", gone, prev))
        return gone

    def _emit(self, ch: _Change) -> None:
        self.history.append(ch)
        for w in list(self._watchers):
            if w.res == ch.res:
                w.queue.put_nowait(ch)

    @staticmethod
    def _event_for(w: _Watcher, ch: _Change) -> tuple[str, dict[str, Any]] | None:
        """What a watcher with a selector sees: transitions in/out of the selector become ADDED/DELETED."""
        now_in = ch.type != "DELETED" and w.flt.matches(ch.obj)
        was_in = w.flt.matches(ch.prev)
        if ch.type == "DELETED":
            return ("DELETED", ch.obj) if was_in else None
        if now_in and was_in:
            return ("MODIFIED", ch.obj)
        if now_in:
            return ("ADDED", ch.obj)
        if was_in:
            return ("DELETED", ch.obj)
        return None

    # ---- HTTP ------------------------------------------------------------------------------------

    def _json(self, body: dict[str, Any], status: int = 200) -> web.Response:
        return web.json_response(body, status=status)

    def _authorize(
        self, req: web.Request, verb: str, group: str, plural: str, ns: str, name: str
    ) -> web.Response | None:
        if self.token is not None and req.headers.get("Authorization") != f"Bearer {self.token}":
            self.requests.append(RecordedRequest(verb, group, plural, ns, name, False))
            return self._json(status_body(401, "Unauthorized", "Unauthorized"), 401)
        allowed = self.rules is None or any(
            (group in r.get("apiGroups", []) or "*" in r.get("apiGroups", []))
            and (plural in r.get("resources", []) or "*" in r.get("resources", []))
            and (verb in r.get("verbs", []) or "*" in r.get("verbs", []))
            and (not r.get("resourceNames") or name in r["resourceNames"])
            for r in self.rules
        )
        self.requests.append(RecordedRequest(verb, group, plural, ns, name, allowed))
        if allowed:
            return None
        what = f'resource "{plural}" in API group "{group}"'
        return self._json(
            status_body(
                403,
                "Forbidden",
                f'{plural}{"." + group if group else ""} is forbidden: User "{self.user}" cannot {verb} {what} in the namespace "{ns}"',
                kind=plural,
                name=name,
                group=group,
            ),
            403,
        )

    def _resource(self, req: web.Request) -> tuple[str, str, str] | None:
        m = req.match_info
        res = (m.get("group", ""), m["version"], m["plural"])
        return res if res in self.resources else None

    async def _collection(self, req: web.Request) -> web.StreamResponse:
        res = self._resource(req)
        ns = req.match_info["ns"]
        if res is None:
            return self._json(
                status_body(404, "NotFound", "the server could not find the requested resource"), 404
            )
        watch = _parse_bool(req.query.get("watch", ""))
        verb = {"GET": "watch" if watch else "list", "POST": "create", "DELETE": "deletecollection"}.get(
            req.method
        )
        if verb is None:
            return self._json(status_body(405, "MethodNotAllowed", f"{req.method} not allowed"), 405)
        denied = self._authorize(req, verb, res[0], res[2], ns, "")
        if denied is not None:
            return denied
        if verb == "create":
            obj = await req.json()
            meta = obj.setdefault("metadata", {})
            meta["namespace"] = ns
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            if (res, ns, meta.get("name")) in self.objects:
                return self._json(
                    status_body(409, "AlreadyExists", f'{res[2]} "{meta.get("name")}" already exists'), 409
                )
            meta.pop("resourceVersion", None)
            return self._json(self._store(res, obj, None), 201)
        if verb == "deletecollection":
            return self._json(status_body(405, "MethodNotAllowed", "deletecollection not supported"), 405)
        flt = _Filter(ns, req.query.get("labelSelector", ""))
        try:
            parse_selector(flt.labels)
        except ValueError as e:
            return self._json(status_body(400, "BadRequest", f"unable to parse requirement: {e}"), 400)
        fsel = req.query.get("fieldSelector", "")
        if fsel:
            k, _, v = fsel.partition("=")
            if k != "metadata.name":
                return self._json(status_body(400, "BadRequest", f"field label not supported: {k}"), 400)
            flt.name = v.lstrip("=")
        rv_s = req.query.get("resourceVersion", "")
        rv = int(rv_s) if rv_s.isdigit() else 0
        if watch:
            return await self._watch(req, res, flt, rv, _parse_bool(req.query.get("allowWatchBookmarks", "")))
        if rv and rv < self.compacted_rv:
            return self._json(
                status_body(410, "Expired", f"too old resource version: {rv} ({self.compacted_rv})"), 410
            )
        items = [copy.deepcopy(o) for (r, _, _), o in self.objects.items() if r == res and flt.matches(o)]
        if res[0] == "":
            for o in items:  # the API server leaves kind/apiVersion out of built-in list items
                o.pop("kind", None)
                o.pop("apiVersion", None)
        group, version, _ = res
        return self._json(
            {
                "kind": self.resources[res] + "List",
                "apiVersion": f"{group}/{version}" if group else version,
                "metadata": {"resourceVersion": str(self.rv)},
                "items": items,
            }
        )

    async def _watch(
        self, req: web.Request, res: tuple[str, str, str], flt: _Filter, rv: int, bookmarks: bool
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(req)

        async def send(type_: str, obj: dict[str, Any]) -> None:
            await resp.write(json.dumps({"type": type_, "object": obj}).encode() + b"\n")

        if rv and rv < self.compacted_rv:
            await send(
                "ERROR", status_body(410, "Expired", f"too old resource version: {rv} ({self.compacted_rv})")
            )
            return resp
        w = _Watcher(res, flt)
        self._watchers.add(w)
        # changes up to now are sent from the snapshot/history below; the queue carries later ones
        last = self.rv
        replay = [c for c in self.history if c.res == res and c.rv > rv] if rv else []
        current = (
            [o for (r, _, _), o in self.objects.items() if r == res and flt.matches(o)] if not rv else []
        )
        timeout = float(req.query.get("timeoutSeconds", "0") or 0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout > 0 else float("inf")
        try:
            for o in current:  # no resourceVersion: synthetic ADDED for the current state first
                await send("ADDED", o)
            for ch in replay:
                ev = self._event_for(w, ch)
                if ev:
                    await send(*ev)
            while True:
                wait = min(self.bookmark_interval if bookmarks else 3600.0, deadline - loop.time())
                if wait <= 0:
                    break
                try:
                    item = await asyncio.wait_for(w.queue.get(), wait)
                except TimeoutError:
                    if bookmarks and loop.time() < deadline:
                        kind = self.resources[res]
                        group, version, _ = res
                        await send(
                            "BOOKMARK",
                            {
                                "kind": kind,
                                "apiVersion": f"{group}/{version}" if group else version,
                                "metadata": {"resourceVersion": str(self.rv)},
                            },
                        )
                    continue
                if item == "abort":
                    if req.transport is not None:
                        req.transport.abort()
                    return resp
                if item == "expire":
                    await send("ERROR", status_body(410, "Expired", "too old resource version"))
                    return resp
                assert isinstance(item, _Change)
                if item.rv <= last:
                    continue
                ev = self._event_for(w, item)
                if ev:
                    await send(*ev)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._watchers.discard(w)
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp

    async def _token_review(self, req: web.Request) -> web.StreamResponse:
        denied = self._authorize(req, "create", "authentication.k8s.io", "tokenreviews", "", "")
        if denied is not None:
            return denied
        body = await req.json()
        user = self.users.get(str((body.get("spec") or {}).get("token", "")))
        body["status"] = (
            {"authenticated": True, "user": user, "audiences": []} if user else {"authenticated": False}
        )
        return self._json(body, 201)

    async def _access_review(self, req: web.Request) -> web.StreamResponse:
        denied = self._authorize(req, "create", "authorization.k8s.io", "subjectaccessreviews", "", "")
        if denied is not None:
            return denied
        body = await req.json()
        spec = body.get("spec") or {}
        nra = spec.get("nonResourceAttributes") or {}
        subjects = [spec.get("user", ""), *(spec.get("groups") or [])]
        allowed = any((s, nra.get("path"), nra.get("verb")) in self.nonresource_grants for s in subjects)
        body["status"] = (
            {"allowed": allowed} if allowed else {"allowed": False, "reason": "no RBAC rule allows it"}
        )
        return self._json(body, 201)

    async def _item(self, req: web.Request) -> web.StreamResponse:
        res = self._resource(req)
        ns, name = req.match_info["ns"], req.match_info["name"]
        if res is None:
            return self._json(
                status_body(404, "NotFound", "the server could not find the requested resource"), 404
            )
        verb = {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(req.method)
        if verb is None:
            return self._json(status_body(405, "MethodNotAllowed", f"{req.method} not allowed"), 405)
        denied = self._authorize(req, verb, res[0], res[2], ns, name)
        if denied is not None:
            return denied
        cur = self.objects.get((res, ns, name))
        not_found = status_body(404, "NotFound", f'{res[2]} "{name}" not found', name=name, kind=res[2])
        if verb == "get":
            return self._json(cur, 200) if cur else self._json(not_found, 404)
        if verb == "delete":
            gone = self._delete(res, ns, name)
            return self._json(gone, 200) if gone else self._json(not_found, 404)
        if verb == "patch":
            return self._json(
                status_body(415, "UnsupportedMediaType", "patch not supported by the fake"), 415
            )
        obj = await req.json()
        if cur is None:
            return self._json(not_found, 404)
        meta = obj.setdefault("metadata", {})
        sent_rv = meta.get("resourceVersion")
        if sent_rv and sent_rv != cur["metadata"]["resourceVersion"]:
            return self._json(
                status_body(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {res[2]} "{name}": the object has been modified; '
                    "please apply your changes to the latest version and try again",
                    name=name,
                    kind=res[2],
                ),
                409,
            )
        meta["namespace"], meta["name"] = ns, name
        meta["uid"] = cur["metadata"]["uid"]
        meta["creationTimestamp"] = cur["metadata"]["creationTimestamp"]
        return self._json(self._store(res, obj, cur), 200)


def role_rules(rules: Iterable[tuple[str, str, Iterable[str]]]) -> list[Rule]:
    """Shorthand: [(apiGroup, resource, verbs), ...] -> Role rules."""
    return [{"apiGroups": [g], "resources": [r], "verbs": list(v)} for g, r, v in rules]
