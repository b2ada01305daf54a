"""Processing-time histograms of the ext_proc path (what the picker costs per request and message)."""

from __future__ import annotations

from ingate.telemetry import FastHistogram

_PROCESSING_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.1, 1.0, 10.0)


class ExtProcTimings:
    """The picker's own cost on the ext_proc path, for operators (no benchmark needed):

    - `ingate_picker_request_processing_seconds`: from the complete request body to the routing
      answers (parsing, objective, flow-control wait, scheduling, building the answers);
    - `ingate_picker_response_processing_seconds`: handling one streamed response chunk (first-token
      and usage bookkeeping, the echo), per message.
    """

    def __init__(self) -> None:
        self.request = FastHistogram(
            "ingate_picker_request_processing_seconds",
            "Picker time from the complete request body to the routing answer (incl. flow-control wait).",
            _PROCESSING_BUCKETS,
        )
        self.response = FastHistogram(
            "ingate_picker_response_processing_seconds",
            "Picker time spent on one streamed response message.",
            _PROCESSING_BUCKETS,
        )

    def collectors(self) -> list[FastHistogram]:
        return [self.request, self.response]
