"""Two pickers with leader election: kill -9 the leader's process, the other leads within the lease."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from ingate.kube.controller import required_rules
from ingate.kube.fakeapi import FakeApiServer
from ingate.kube.leader import LeaseElector

LEASE_S, RENEW_S, RETRY_S = 2.0, 1.5, 0.2


@pytest.mark.e2e
async def test_kill_9_leader_standby_takes_over_within_lease_duration(tmp_path: Path) -> None:
    async with FakeApiServer(required_rules(leader_election=True)) as server:
        kc = str(server.write_kubeconfig(tmp_path / "kubeconfig", "ns"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ingate.kube.leader",
            "--kubeconfig",
            kc,
            "--namespace",
            "ns",
            "--name",
            "epp",
            "--identity",
            "replica-1",
            "--lease-duration",
            str(LEASE_S),
            "--renew-deadline",
            str(RENEW_S),
            "--retry-period",
            str(RETRY_S),
            stdout=asyncio.subprocess.PIPE,
        )
        standby = LeaseElector(
            "ns",
            "epp",
            "replica-2",
            kubeconfig=kc,
            lease_duration_s=LEASE_S,
            renew_deadline_s=RENEW_S,
            retry_period_s=RETRY_S,
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line.strip() == b"LEADING"
            await standby.start()
            await asyncio.sleep(3 * RETRY_S)
            assert not standby.is_leader and standby.leader_identity == "replica-1"
            os.kill(proc.pid, signal.SIGKILL)
            killed = time.monotonic()
            await proc.wait()
            while not standby.is_leader:
                assert time.monotonic() - killed < 3 * LEASE_S, "standby never took over"
                await asyncio.sleep(0.01)
            took = time.monotonic() - killed
            print(f"standby leading {took:.2f}s after kill -9 (lease duration {LEASE_S}s)")
            # the standby waits out a full lease duration from the last renewal it saw (<= kill time),
            # then acquires on its next try (retry period + jitter)
            assert took <= LEASE_S + 1.2 * RETRY_S + 0.3, took
            lease = server.get("coordination.k8s.io/v1", "Lease", "ns", "epp")
            assert lease is not None and lease["spec"]["holderIdentity"] == "replica-2"
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await standby.stop()
