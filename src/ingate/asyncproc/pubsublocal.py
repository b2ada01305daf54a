"""A throwaway Google Cloud Pub/Sub emulator on a loopback port (tests and demos).

The emulator ships with the Google Cloud SDK (``gcloud components install pubsub-emulator``, or the
Debian/RPM package ``google-cloud-cli-pubsub-emulator``) and needs Java 11+. It keeps everything in
memory. Clients find it through ``PUBSUB_EMULATOR_HOST``.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ingate.procs import ChildProcess, spawn

_SDK_PATHS = (
    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator",
    "/usr/share/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator",
    "/opt/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator",
)


def emulator_binary() -> str | None:
    """The emulator's launcher (``INGATE_PUBSUB_EMULATOR``, PATH, or a Cloud SDK install), None when
    it or Java is missing."""
    if shutil.which("java") is None:
        return None
    env = os.environ.get("INGATE_PUBSUB_EMULATOR")
    candidates = [env] if env else []
    candidates += [shutil.which("cloud-pubsub-emulator") or "", *_SDK_PATHS]
    return next((c for c in candidates if c and Path(c).is_file()), None)


@contextmanager
def local_pubsub(workdir: Path, *, timeout_s: float = 60.0) -> Iterator[str]:
    """Start the emulator; yields its ``HOST:PORT`` (set ``PUBSUB_EMULATOR_HOST`` to it)."""
    binary = emulator_binary()
    if binary is None:
        raise FileNotFoundError("the Pub/Sub emulator (Cloud SDK pubsub-emulator) or Java is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc: ChildProcess = spawn([binary, "--host=127.0.0.1", f"--port={port}"], workdir / f"pubsub-{port}.log")
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.proc.poll() is not None:
                raise RuntimeError(f"Pub/Sub emulator exited: {proc.tail()}")
            if "Server started" in proc.tail():
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"Pub/Sub emulator did not start: {proc.tail()}")
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.stop()
