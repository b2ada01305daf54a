"""The results file `ingate bench run` writes: plain JSON, one line per request record."""

from __future__ import annotations

import orjson

from ingate.bench.runner import results_json


def _results() -> dict:
    recs = [
        {"send": 0.123456789, "ttft": 0.2500000004, "status": 200, "error": "", "stream": k % 2}
        for k in range(50)
    ]
    stage = {"rate": 8.0, "summary": {"ttft_p90": 0.25000000012, "sent": 50}, "records": recs}
    return {
        "format": "ingate-bench/1",
        # A prompt-like string that looks like a placeholder must come back untouched.
        "workload": {"name": "w", "description": '"@@records-0@@"'},
        "systems": [
            {"name": "ingate", "stages": [stage, {**stage, "records": []}]},
            {"name": "sglang-router", "unavailable": "not installed"},
        ],
    }


def test_records_are_one_line_each_and_everything_else_reads_back() -> None:
    res = _results()
    raw = results_json(res)
    back = orjson.loads(raw)
    assert back["workload"] == res["workload"] and back["systems"][1] == res["systems"][1]
    st = back["systems"][0]["stages"][0]
    assert st["summary"] == res["systems"][0]["stages"][0]["summary"]  # summaries keep full precision
    assert back["systems"][0]["stages"][1]["records"] == []
    # Record times to the microsecond, every other field as it was.
    assert st["records"][0] == {"send": 0.123457, "ttft": 0.25, "status": 200, "error": "", "stream": 0}
    assert len(st["records"]) == 50
    lines = [ln for ln in raw.splitlines() if b'"send":' in ln]
    assert len(lines) == 50  # one line per request
    assert len(raw) < len(orjson.dumps(res, option=orjson.OPT_INDENT_2)) / 2
