"""Flow control: priority bands, fair queuing across flows (tenants), saturation detection, shedding.

The director calls :meth:`FlowController.admit` between objective resolution and scheduling, and
:meth:`FlowController.release` once the response is complete. See docs/flow-control.md.
"""

from ingate.flowcontrol.build import build_flow_controller
from ingate.flowcontrol.config import BandConfig, FlowControlConfig
from ingate.flowcontrol.controller import FlowController, Ticket
from ingate.flowcontrol.fairness import jain_index
from ingate.flowcontrol.saturation import SaturationDetector

__all__ = [
    "BandConfig",
    "FlowControlConfig",
    "FlowController",
    "SaturationDetector",
    "Ticket",
    "build_flow_controller",
    "jain_index",
]
