"""List + watch of one resource, the way client-go's reflector does it.

List (no resourceVersion: a consistent read) -> hand every object to `on_list` -> watch from the list's
resourceVersion with bookmarks -> hand each event to `on_event`, remembering the newest resourceVersion
(objects and bookmarks). When the stream ends (server timeout) or the connection breaks (API server
restarted, network), watch again from that resourceVersion after a backoff with full jitter; only a 410
Gone (history compacted) forces a relist, and consumers make relists churn-free by diffing. A 401/403
is logged as an error naming the verb and resource (the Role must grant it) and retried slowly; a 404
on the list means the resource is not served (its CRD is not installed): `absent` is set.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from ingate.kube.client import KubeAccessDenied, KubeApiError, error_from

log = logging.getLogger("ingate.kube")

ListFn = Callable[..., Awaitable[Any]]


class _Gone(Exception):
    """410: the resourceVersion we watch from is too old; relist."""


class Informer:
    """See the module docstring. `list_fn` is a kubernetes_asyncio list method bound to its arguments
    (namespace, group/version/plural) except selectors and watch parameters."""

    def __init__(
        self,
        what: str,
        list_fn: ListFn,
        on_list: Callable[[list[dict[str, Any]]], None],
        on_event: Callable[[str, dict[str, Any]], None],
        *,
        label_selector: str = "",
        field_selector: str = "",
        backoff_base_s: float = 0.2,
        backoff_max_s: float = 10.0,
        watch_timeout_s: int = 300,
        rng: random.Random | None = None,
        optional: bool = False,
    ) -> None:
        self.what = what
        self.optional = optional
        """A resource the picker can do without (objectives, rewrites): not served (404) or not
        permitted (403) marks it `absent` with one log line instead of blocking readiness."""
        self._list_fn = list_fn
        self._on_list, self._on_event = on_list, on_event
        self._selectors: dict[str, str] = {}
        if label_selector:
            self._selectors["label_selector"] = label_selector
        if field_selector:
            self._selectors["field_selector"] = field_selector
        self._base, self._max = backoff_base_s, backoff_max_s
        self._watch_timeout = watch_timeout_s
        self._rng = rng or random.Random()
        self.synced = asyncio.Event()
        """Set once listed and the watch is open (from then on no change is missed), or when the
        resource turned out absent (not served)."""
        self.absent = False
        """Not tracked: not served (its CRD is not installed) or, when optional, not permitted."""
        self.error: KubeApiError | None = None
        """The last API error (cleared by the next success); KubeAccessDenied for RBAC problems."""
        self.resource_version: str | None = None
        self.lists = 0
        """How many times the resource was listed (1 + relists after 410)."""
        self.watches = 0
        """Watch connections opened."""

    def _delay(self, attempt: int) -> float:
        return self._rng.uniform(0, min(self._max, self._base * 2**attempt))  # full jitter

    async def run(self) -> None:
        """Run until cancelled."""
        attempt = 0
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                await self._watch()
                attempt = 0
            except _Gone:
                log.info(
                    "watch %s: resourceVersion %s expired (410), relisting", self.what, self.resource_version
                )
                self.resource_version = None
            except KubeApiError as e:
                self.error = e
                denied = isinstance(e, KubeAccessDenied)
                if (e.status == 404 and self.resource_version is None) or (self.optional and denied):
                    if not self.absent:
                        if denied:
                            log.warning(
                                "kube: %s; going on without %s (grant it in the Role to use it)", e, self.what
                            )
                        else:
                            log.info(
                                "%s is not served by the API server (CRD not installed?); will retry",
                                self.what,
                            )
                    self.absent = True
                    self.resource_version = None
                    self.synced.set()
                    await asyncio.sleep(self._max)
                    continue
                lvl = logging.ERROR if isinstance(e, KubeAccessDenied) else logging.WARNING
                log.log(lvl, "kube %s failed: %s", self.what, e)
                await asyncio.sleep(self._max if isinstance(e, KubeAccessDenied) else self._delay(attempt))
                attempt += 1
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
                # API server gone or restarting, connection reset, truncated stream: resume the watch
                log.warning(
                    "kube %s: connection lost (%s: %s); retrying from resourceVersion %s",
                    self.what,
                    type(e).__name__,
                    e,
                    self.resource_version,
                )
                await asyncio.sleep(self._delay(attempt))
                attempt += 1

    async def _list(self) -> None:
        resp = await self._list_fn(**self._selectors, _preload_content=False, _request_timeout=30)
        if resp.status != 200:
            raise await error_from(resp, f"list {self.what}")
        body = orjson.loads(await resp.read())
        resp.release()
        self.lists += 1
        try:
            self._on_list(body.get("items") or [])
        except Exception:  # a consumer bug on one object must not stop the watch
            log.exception("kube %s: handling the list failed", self.what)
        self.resource_version = str(body["metadata"]["resourceVersion"])
        self.error, self.absent = None, False

    async def _watch(self) -> None:
        resp = await self._list_fn(
            **self._selectors,
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self._watch_timeout,
            _preload_content=False,
            # the server ends the stream after timeout_seconds; a silent, half-open connection is cut here
            _request_timeout=aiohttp.ClientTimeout(sock_connect=10, total=self._watch_timeout + 30),
        )
        if resp.status == 410:
            resp.release()
            raise _Gone
        if resp.status != 200:
            raise await error_from(resp, f"watch {self.what}")
        self.watches += 1
        self.error = None
        self.synced.set()
        try:
            async for line in resp.content:
                if not line.strip():
                    continue
                ev = orjson.loads(line)
                typ, obj = ev.get("type"), ev.get("object") or {}
                if typ == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone
                    raise KubeApiError(
                        int(obj.get("code", 500)),
                        str(obj.get("reason", "")),
                        str(obj.get("message", "")),
                        self.what,
                    )
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if typ != "BOOKMARK":
                    try:
                        self._on_event(typ, obj)
                    except Exception:  # a consumer bug on one object must not stop the watch
                        log.exception("kube %s: handling a %s event failed", self.what, typ)
                if rv:
                    self.resource_version = str(rv)
        finally:
            resp.close()
