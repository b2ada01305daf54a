"""A vLLM-compatible model-server simulator (``ingate sim``).

One process hosts one or many replicas, each an aiohttp server on its own port speaking the OpenAI API
and vLLM's metric names, backed by a stepped continuous-batching engine whose step times come from real
H100 measurements (see docs/simulator.md and calibration/).

In-process use (tests, benchmarks)::

    from ingate.sim import SimFleetConfig, start_fleet
    async with start_fleet(SimFleetConfig(replicas=4, time_scale=10)) as fleet:
        fleet.addresses            # ["127.0.0.1:41234", ...]
        fleet.replicas[0].engine   # the engine, for white-box checks

From another process: ``ingate sim --replicas 4 --base-port 0 --ready-file ready.json`` writes
``{"replicas": [{"index": 0, "address": "127.0.0.1:41234", "profile": "h100-llama3-8b"}, ...]}``
once every replica listens.
"""

from ingate.sim.fleet import SimFleet, SimFleetConfig, start_fleet
from ingate.sim.profiles import PROFILES, SimProfile

__all__ = ["PROFILES", "SimFleet", "SimFleetConfig", "SimProfile", "start_fleet"]
