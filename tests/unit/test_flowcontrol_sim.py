"""Simulation-level fairness: a fixed-throughput server on a virtual clock, two backlogged tenants."""

from __future__ import annotations

import asyncio
from collections import deque

import pytest
from prometheus_client import CollectorRegistry

from ingate.datastore import Datastore, Endpoint
from ingate.errors import GatewayError
from ingate.flowcontrol import FlowControlConfig, FlowController, Ticket, jain_index
from ingate.flowcontrol.metrics import FlowControlMetrics
from ingate.lifecycle import ResponseInfo
from ingate.request import InferenceRequest

THROUGHPUT = 2000.0  # tokens per virtual second, prompt and completion alike
DT = 0.01
SCRAPE_EVERY = 5  # steps: 50 ms scrape interval
COMPLETION = 10


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Server:
    """One FIFO model server that works through queued tokens at a fixed rate."""

    def __init__(self) -> None:
        self.queue: deque[tuple[Ticket, int, str]] = deque()
        self.progress = 0.0
        self.served: dict[str, int] = {}

    def step(self, fc: FlowController, ep: Endpoint, now: float, window_start: float) -> None:
        budget = THROUGHPUT * DT
        while self.queue and budget > 0:
            ticket, prompt, flow = self.queue[0]
            need = prompt + COMPLETION - self.progress
            if need > budget:
                self.progress += budget
                return
            budget -= need
            self.progress = 0.0
            self.queue.popleft()
            ep.in_flight -= 1
            if now >= window_start:
                self.served[flow] = self.served.get(flow, 0) + prompt + COMPLETION
            fc.release(ticket, ResponseInfo(status=200, prompt_tokens=prompt, completion_tokens=COMPLETION))


async def simulate(
    policy: str, rates: dict[str, float], prompts: dict[str, int], seconds: float
) -> dict[str, int]:
    clock = Clock()
    ep = Endpoint("sim", "127.0.0.1", 1)
    ds = Datastore([ep])
    cfg = FlowControlConfig(default_policy=policy, flow_max_requests=50)
    cfg.saturation.queue_depth_threshold = 2
    fc = FlowController(cfg, ds, clock=clock, metrics=FlowControlMetrics(CollectorRegistry()))
    server = Server()
    owed = dict.fromkeys(rates, 0.0)
    tasks: set[asyncio.Task[None]] = set()

    async def client(flow: str) -> None:
        prompt = prompts[flow]
        r = InferenceRequest(
            request_id="x",
            path="/v1/completions",
            model="m",
            prompt_text="x" * (4 * prompt),
            stream=False,
            max_tokens=COMPLETION,
            body={},
            raw_body=b"",
            headers={},
            fairness_id=flow,
        )
        try:
            ticket = await fc.admit(r, est_tokens=prompt)
        except GatewayError:
            return  # queue full / expired: the tenant's excess load is turned away
        ep.in_flight += 1  # what the director does once the scheduler picked the endpoint
        server.queue.append((ticket, prompt, flow))

    steps = int(seconds / DT)
    for i in range(steps):
        clock.t = i * DT
        if i % SCRAPE_EVERY == 0:
            ep.metrics.waiting = max(0, len(server.queue) - 1)
            ep.metrics.updated_at = clock.t
        for flow, rate in rates.items():
            owed[flow] += rate * DT
            while owed[flow] >= 1:
                owed[flow] -= 1
                t = asyncio.create_task(client(flow))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
        await asyncio.sleep(0)
        fc.pump()
        for _ in range(3):
            await asyncio.sleep(0)
        server.step(fc, ep, clock.t, window_start=seconds / 2)
    await fc.stop()
    await asyncio.gather(*tasks)
    return server.served


@pytest.mark.parametrize("policy", ["vtc", "round-robin"])
async def test_two_tenants_10x_offered_load_equal_sizes(policy: str) -> None:
    # Capacity ~22 req/s (fair share ~11 each); "big" offers 150 req/s, "small" 15: both backlogged.
    served = await simulate(policy, {"big": 150.0, "small": 15.0}, {"big": 80, "small": 80}, seconds=20)
    assert served["big"] > 0 and served["small"] > 0
    assert jain_index(served.values()) >= 0.95, served


async def test_vtc_equalises_tokens_when_one_tenant_sends_10x_longer_prompts() -> None:
    # Same request rate, 10x the tokens per request: VTC shares tokens, round robin would share requests.
    prompts = {"long": 800, "short": 80}
    rates = {"long": 20.0, "short": 20.0}
    vtc = await simulate("vtc", rates, prompts, seconds=20)
    assert jain_index(vtc.values()) >= 0.95, vtc
    rr = await simulate("round-robin", rates, prompts, seconds=20)
    assert jain_index(rr.values()) < 0.8, rr  # the contrast that makes VTC worth having
