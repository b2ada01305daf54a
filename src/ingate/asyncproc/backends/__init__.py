"""Queue backends behind one interface (:class:`~ingate.asyncproc.backends.base.QueueBackend`).

``open_backend(url)`` picks one from a queue URL:

- ``PATH``, ``sqlite:PATH`` or ``sqlite:///ABS/PATH``: the embedded SQLite queue (the default);
- ``redis://HOST:PORT/DB?stream=NAME&group=NAME``: Redis Streams with a consumer group;
- ``redis-sortedset://HOST:PORT/DB?queue=request-sortedset&results=result-list&retry=retry-sortedset``:
  llm-d-async's sorted-set layout (drop-in next to its producers and result consumers).

- ``pubsub://PROJECT/SUBSCRIPTION?results=TOPIC&ledger=PATH_OR_REDIS_URL``: Google Cloud Pub/Sub (optional
  ``dead=TOPIC`` for dead letters, ``topic=TOPIC`` the request topic for ``submit`` when the
  subscription cannot be read, ``create=1`` to create topics and subscription: emulator and demos).

Both Redis forms take ``cluster=1`` for a Redis Cluster (the URL names any one node; DB must be 0).
The stream backend puts its keys under the hash tag ``{NAME}``; the sorted-set layout keeps the key
names llm-d-async uses, so on a cluster they must carry one hash tag themselves
(``queue={q}request-sortedset&results={q}result-list&retry={q}retry-sortedset``), checked at start.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from ingate.asyncproc.backends.base import QueueBackend


def _flag(q: dict[str, str], name: str) -> bool:
    v = q.get(name, "0").lower()
    if v not in ("0", "1", "true", "false", "yes", "no"):
        raise ValueError(f"queue URL option {name}={v!r}: use 1 or 0")
    return v in ("1", "true", "yes")


def open_backend(url: str) -> QueueBackend:
    """The backend a queue URL names (see the module docstring). Raises ValueError on a bad URL."""
    if url.startswith("pubsub://"):
        return _pubsub(url)
    if url.startswith(("redis-sortedset://", "rediss-sortedset://")):
        from ingate.asyncproc.backends.llmd_sortedset import LlmdSortedSetBackend

        parts = urlsplit(url)
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        base = parts._replace(scheme=parts.scheme.replace("-sortedset", ""), query="").geturl()
        return LlmdSortedSetBackend(
            base,
            queue=q.get("queue", "request-sortedset"),
            results=q.get("results", "result-list"),
            retry=q.get("retry", "retry-sortedset"),
            cluster=_flag(q, "cluster"),
        )
    if url.startswith(("redis://", "rediss://", "unix://")):
        from ingate.asyncproc.backends.redis_streams import RedisStreamsBackend

        parts = urlsplit(url)
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        base = parts._replace(query="").geturl()
        return RedisStreamsBackend(
            base,
            stream=q.get("stream", "ingate-async"),
            group=q.get("group", "ingate-async"),
            cluster=_flag(q, "cluster"),
        )
    from ingate.asyncproc.backends.sqlite import SqliteBackend

    if url.startswith("sqlite://"):
        path = url[len("sqlite://") :]
    elif url.startswith("sqlite:"):
        path = url[len("sqlite:") :]
    elif "://" in url:
        raise ValueError(f"unknown queue URL scheme in {url!r} (use a file path, sqlite:PATH or redis://...)")
    else:
        path = url
    if not path:
        raise ValueError("sqlite queue URL without a path")
    return SqliteBackend(path)


def _pubsub(url: str) -> QueueBackend:
    from ingate.asyncproc.backends.ledger import open_ledger
    from ingate.asyncproc.backends.pubsub import PubSubBackend

    parts = urlsplit(url)
    q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    project, subscription = parts.netloc, parts.path.strip("/")
    if not project or not subscription or "/" in subscription:
        raise ValueError(f"queue URL {url!r}: use pubsub://PROJECT/SUBSCRIPTION?results=TOPIC")
    if not q.get("results"):
        raise ValueError(f"queue URL {url!r}: results=TOPIC (the result topic) is required")
    return PubSubBackend(
        project,
        subscription,
        result_topic=q["results"],
        ledger=open_ledger(q.get("ledger", "ingate-async-ledger.db")),
        dead_topic=q.get("dead"),
        request_topic=q.get("topic"),
        create=_flag(q, "create"),
    )
