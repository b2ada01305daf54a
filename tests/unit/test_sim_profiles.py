"""The H100 profile's constants are the least-squares fit of the committed calibration JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from ingate.sim.profiles import (
    H100_LLAMA3_8B,
    H100_SXM,
    L4_LLAMA3_8B,
    PROFILES,
    TPU_V6E_LLAMA3_8B,
    estimate_profile,
    get_profile,
    kv_cache_blocks,
)

CAL = Path(__file__).resolve().parents[2] / "calibration"


def _fit_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fit_llm_steps", CAL / "fit_llm_steps.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fits() -> tuple[list[float], list[float]]:
    """Re-run calibration/fit_llm_steps.py's least squares on the committed JSON (CUDA-graph column)."""
    fit = _fit_module()
    res = json.loads((CAL / "h100-llama3-8b-bf16.json").read_text())
    pre = [r for r in res["prefill"] if r["tokens"] >= 512 and "median_ms" in r.get("graph", {})]
    prefill = fit.lstsq_rel(
        [[1, r["batch"] * r["tokens"], r["batch"] * r["tokens"] ** 2] for r in pre],
        [r["graph"]["median_ms"] for r in pre],
    )
    dec = [r for r in res["decode"] if "median_ms" in r.get("graph", {})]
    decode = fit.lstsq_rel(
        [[1, r["batch"], r["batch"] * r["context"]] for r in dec],
        [r["graph"]["median_ms"] for r in dec],
    )
    return prefill, decode


def test_h100_profile_matches_fit_within_one_percent() -> None:
    (a, b, c), (d, e, f) = _fits()
    p = H100_LLAMA3_8B
    for got, want in [
        (p.prefill_base, a),
        (p.prefill_per_token, b),
        (p.prefill_quadratic, c),
        (p.decode_base, d),
        (p.decode_per_seq, e),
        (p.decode_per_ctx_token, f),
    ]:
        assert got == pytest.approx(want, rel=0.01)


def test_h100_kv_capacity_is_the_measured_one() -> None:
    assert H100_LLAMA3_8B.num_gpu_blocks * H100_LLAMA3_8B.block_size == pytest.approx(446_809, abs=16)


def test_profile_step_times_reproduce_measured_points() -> None:
    p = H100_LLAMA3_8B
    # 1 x 2048-token prefill measured 61.1 ms; a 64-sequence decode at 2048 context in the table.
    assert p.step_ms(2048, 2048**2, 0, 0) == pytest.approx(61.1, rel=0.05)
    # Small prefills cost about the decode floor.
    assert p.step_ms(16, 16**2, 0, 0) == pytest.approx(p.step_floor, rel=0.01)
    # Decode step grows with batch and context.
    assert p.step_ms(0, 0, 64, 64 * 2048) > p.step_ms(0, 0, 8, 8 * 512)


def test_l4_is_slower_everywhere_and_smaller() -> None:
    h, l4 = H100_LLAMA3_8B, L4_LLAMA3_8B
    assert l4.step_ms(0, 0, 32, 32 * 1000) > 5 * h.step_ms(0, 0, 32, 32 * 1000)
    assert l4.step_ms(4096, 4096**2, 0, 0) > 5 * h.step_ms(4096, 4096**2, 0, 0)
    assert l4.num_gpu_blocks < h.num_gpu_blocks


def test_estimates_reproduce_the_h100_from_its_own_specs() -> None:
    # The memory model gives the measured KV capacity back, and scaling by ratios of 1 is the identity.
    assert kv_cache_blocks(H100_SXM.memory_bytes, 8192) == pytest.approx(27_925, rel=0.001)
    same = estimate_profile("h100-again", H100_SXM)
    for f in ("decode_base", "step_floor", "decode_per_seq", "decode_per_ctx_token", "prefill_base",
              "prefill_per_token", "prefill_quadratic"):  # fmt: skip
        assert getattr(same, f) == pytest.approx(getattr(H100_LLAMA3_8B, f))


def test_estimated_profiles_are_labelled_and_ordered_by_their_specs() -> None:
    h, l4, v6e = H100_LLAMA3_8B, L4_LLAMA3_8B, TPU_V6E_LLAMA3_8B
    assert all(p.source.startswith("estimate") for p in (l4, v6e))
    assert h.source.startswith("measured")
    decode = [p.step_ms(0, 0, 32, 32 * 1000) for p in (h, v6e, l4)]
    assert decode[0] < decode[1] < decode[2]
    # v6e: 1,638 GB/s against 3,350 -> about 2x slower decode; 918 vs 989 TFLOP/s -> prefill within 10%.
    assert decode[1] / decode[0] == pytest.approx(3350 / 1638, rel=0.05)
    assert v6e.step_ms(4096, 4096**2, 0, 0) == pytest.approx(h.step_ms(4096, 4096**2, 0, 0), rel=0.1)
    assert l4.num_gpu_blocks < v6e.num_gpu_blocks < h.num_gpu_blocks
    assert PROFILES["v6e"] is v6e and PROFILES["l4"] is l4


def test_unknown_profile_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="h100-llama3-8b"):
        get_profile("nope")
