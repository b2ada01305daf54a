"""Named hardware/model profiles: step-time coefficients and capacities of one replica.

Step time of a continuous-batching step that prefills N uncached tokens (chunks n_i on top of k_i cached
tokens) and decodes B sequences holding C = sum(ctx) tokens of context::

    prefill_ms = prefill_base + prefill_per_token * N + prefill_quadratic * sum(n_i * (n_i + 2 k_i))
    step_ms    = max(step_floor, prefill_ms if N else decode_base)
                 + decode_per_seq * B + decode_per_ctx_token * C

The H100 numbers are fitted to real CUDA-graph timings of a Llama-3-8B-shaped model in bf16 on one H100
(calibration/README.md, calibration/h100-llama3-8b-bf16.json; `tests/unit/test_sim_profiles.py` re-runs
the fit on the committed JSON and checks these constants). One forward pass streams the weights once,
so a mixed step pays the floor once; decode tokens of a mixed step add their per-sequence and
KV-reading cost on top.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class SimProfile:
    """Coefficients (milliseconds) and capacities of one simulated replica."""

    name: str
    decode_base: float
    decode_per_seq: float
    decode_per_ctx_token: float
    prefill_base: float
    prefill_per_token: float
    prefill_quadratic: float
    step_floor: float
    num_gpu_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    lora_load_ms: float = 25.0
    source: str = ""
    accelerator: str = "h100"
    """Accelerator type of one replica (the benchmark database prices it: bench/prices.yaml)."""
    accelerators: int = 1
    """Accelerators per replica (tensor parallelism)."""

    @property
    def estimated(self) -> bool:
        """True unless the profile was fitted to measurements on its hardware."""
        return not self.source.startswith("measured")

    def step_ms(self, prefill_tokens: int, prefill_quad: float, decode_seqs: int, decode_ctx: int) -> float:
        """Duration of one engine step (see module docstring)."""
        if prefill_tokens:
            pre = (
                self.prefill_base
                + self.prefill_per_token * prefill_tokens
                + self.prefill_quadratic * prefill_quad
            )
        else:
            pre = self.decode_base
        return (
            max(self.step_floor, pre)
            + self.decode_per_seq * decode_seqs
            + self.decode_per_ctx_token * decode_ctx
        )

    def with_overrides(self, **kw: object) -> SimProfile:
        """A copy with some fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})  # type: ignore[arg-type]


# Fitted to calibration/h100-llama3-8b-bf16.json (CUDA-graph column). KV capacity: 446,809 tokens
# = 27,925 blocks of 16 at gpu_memory_utilization 0.9, counted the way vLLM does.
H100_LLAMA3_8B = SimProfile(
    name="h100-llama3-8b",
    decode_base=9.83,
    decode_per_seq=0.01111,
    decode_per_ctx_token=4.307e-5,
    prefill_base=2.905,
    prefill_per_token=0.02777,
    prefill_quadratic=5.39e-7,
    step_floor=9.8,
    num_gpu_blocks=27_925,
    source="measured: H100 80GB HBM3, Llama-3-8B shape, bf16, CUDA graphs (calibration/)",
)

# An estimate, not a measurement: the same model on an NVIDIA L4 (24 GB). Decode is memory-bound:
# L4 has 300 GB/s against the 1.65 TB/s the H100 run achieved, so at a similar 80% efficiency decode
# terms scale by about 1.65 / 0.24 = 6.9. Prefill is compute-bound: 121 vs 989 dense bf16 TFLOP/s,
# about 8.2x. KV: 24 GB x 0.9 - 16.06 GB weights - ~1 GB overhead = ~4.5 GB = ~34k tokens.
L4_LLAMA3_8B = SimProfile(
    name="l4-llama3-8b",
    decode_base=9.83 * 6.9,
    decode_per_seq=0.01111 * 6.9,
    decode_per_ctx_token=4.307e-5 * 6.9,
    prefill_base=2.905 * 8.2,
    prefill_per_token=0.02777 * 8.2,
    prefill_quadratic=5.39e-7 * 8.2,
    step_floor=9.8 * 6.9,
    num_gpu_blocks=2_150,
    max_num_seqs=128,
    max_num_batched_tokens=4096,
    source="estimate: H100 fit scaled by L4/H100 bandwidth (decode) and bf16 FLOP/s (prefill) ratios",
    accelerator="l4",
)

# An estimate, not a measurement: Llama-3.1-70B (80 layers, hidden 8192, 8 KV heads) in bf16 on four
# H100s with tensor parallelism 4. Per GPU a decode step streams 35.3 GB of weights against 16.06 GB for
# the 8B fit (x2.2) and adds ~2.4 ms of all-reduces (2 per layer x 80 layers x ~15 us); per-sequence
# compute scales by layers x hidden^2 / TP (x2.5); per context token each GPU reads 2 of 8 KV heads of
# 80 layers (80 KiB against 128 KiB: x0.625). Prefill FLOPs per token x70/8/4 (x2.2) plus all-reduces
# (x2.4 in all); attention's quadratic term scales by layers x hidden / TP (x1.25). KV per GPU:
# 72 GB (0.9 x 80) - 35.3 GB weights - ~3 GB activations/graphs = ~33.7 GB / 80 KiB = ~411k tokens.
H100X4_LLAMA3_70B = SimProfile(
    name="h100x4-llama3-70b",
    decode_base=9.83 * 2.2 + 2.4,
    decode_per_seq=0.01111 * 2.5,
    decode_per_ctx_token=4.307e-5 * 0.625,
    prefill_base=2.905 * 2.2 + 2.4,
    prefill_per_token=0.02777 * 2.4,
    prefill_quadratic=5.39e-7 * 1.25,
    step_floor=9.8 * 2.2 + 2.4,
    num_gpu_blocks=25_700,
    source="estimate: H100 8B fit scaled to 70B shapes over 4 GPUs (TP4) by bytes and FLOPs per GPU",
    accelerator="h100",
    accelerators=4,
)

# A nearly free engine, for measuring the gateway's own overhead.
NULL_PROFILE = SimProfile(
    name="null",
    decode_base=0.05,
    decode_per_seq=0.0,
    decode_per_ctx_token=0.0,
    prefill_base=0.05,
    prefill_per_token=0.0,
    prefill_quadratic=0.0,
    step_floor=0.05,
    num_gpu_blocks=1_000_000,
    lora_load_ms=0.0,
    source="synthetic: near-zero step time",
    accelerator="none",
    accelerators=0,
)

PROFILES: dict[str, SimProfile] = {
    p.name: p for p in (H100_LLAMA3_8B, L4_LLAMA3_8B, H100X4_LLAMA3_70B, NULL_PROFILE)
}
PROFILES["h100"] = H100_LLAMA3_8B
PROFILES["l4"] = L4_LLAMA3_8B


def get_profile(name: str) -> SimProfile:
    """Look a profile up by name, with a clear error listing the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown simulator profile {name!r}; known: {', '.join(sorted(PROFILES))}"
        ) from None
