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
    """Accelerator type of one replica, as the benchmark database prices it (bench/prices.yaml)."""
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


@dataclass(frozen=True, slots=True)
class Accelerator:
    """Published peak specs of one accelerator (what an estimated profile is scaled by)."""

    name: str
    memory_bytes: float
    bandwidth: float
    """Peak memory bandwidth, bytes/s."""
    bf16_flops: float
    """Peak dense bf16 FLOP/s (without structured sparsity)."""
    source: str


H100_SXM = Accelerator(
    "NVIDIA H100 SXM 80GB",
    85.02e9,  # what the calibration GPU reported
    3.35e12,
    989e12,
    "NVIDIA H100 datasheet: 3.35 TB/s HBM3, 1,979 TFLOPS bf16 with sparsity = 989 dense",
)
L4 = Accelerator(
    "NVIDIA L4",
    24e9,
    300e9,
    121e12,
    "NVIDIA L4 datasheet: 24 GB GDDR6, 300 GB/s, 242 TFLOPS bf16 with sparsity = 121 dense",
)
TPU_V6E = Accelerator(
    "Google TPU v6e (Trillium), one chip",
    32e9,
    1638e9,
    918e12,
    "Cloud TPU v6e docs: 32 GB HBM, 1,638 GB/s, 918 TFLOPS bf16 per chip",
)

# Memory model of one replica serving the Llama-3-8B shape (calibration/README.md): bf16 weights,
# the activation peak of a max_num_batched_tokens prefill (1.24 GB at 8192 tokens, linear in it),
# non-torch memory, and 128 KiB of KV per token, at vLLM's gpu_memory_utilization 0.9.
WEIGHT_BYTES = 16.06e9
ACTIVATION_BYTES_PER_BATCHED_TOKEN = 1.24e9 / 8192
NON_TORCH_BYTES = 0.65e9
KV_BYTES_PER_TOKEN = 131_072
GPU_MEMORY_UTILIZATION = 0.9


def kv_cache_blocks(memory_bytes: float, max_num_batched_tokens: int, block_size: int = 16) -> int:
    """KV blocks left for the cache on a device of `memory_bytes`, counted as vLLM counts them."""
    free = (
        memory_bytes * GPU_MEMORY_UTILIZATION
        - WEIGHT_BYTES
        - ACTIVATION_BYTES_PER_BATCHED_TOKEN * max_num_batched_tokens
        - NON_TORCH_BYTES
    )
    if free <= 0:
        raise ValueError("the weights do not fit")
    return int(free // KV_BYTES_PER_TOKEN) // block_size


def estimate_profile(
    name: str,
    accel: Accelerator,
    *,
    accelerator: str | None = None,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 8192,
    base: SimProfile | None = None,
    base_accel: Accelerator = H100_SXM,
) -> SimProfile:
    """The measured H100 profile moved to another accelerator by its published peak specs.

    Each term scales with the resource it spends, at the efficiency the H100 run reached: the weights
    pass of every step (`decode_base`, `step_floor`) and the KV reads (`decode_per_ctx_token`) by the
    bandwidth ratio; prefill (`prefill_*`) and the per-sequence decode work (`decode_per_seq`) by the
    bf16 FLOP/s ratio; the KV capacity from the memory left after weights (`kv_cache_blocks`). An
    estimate, not a measurement: kernels, compilers (XLA on TPU) and memory systems differ.
    """
    b = base or H100_LLAMA3_8B
    bw = base_accel.bandwidth / accel.bandwidth
    fl = base_accel.bf16_flops / accel.bf16_flops
    return replace(
        b,
        name=name,
        decode_base=b.decode_base * bw,
        step_floor=b.step_floor * bw,
        decode_per_ctx_token=b.decode_per_ctx_token * bw,
        decode_per_seq=b.decode_per_seq * fl,
        prefill_base=b.prefill_base * fl,
        prefill_per_token=b.prefill_per_token * fl,
        prefill_quadratic=b.prefill_quadratic * fl,
        num_gpu_blocks=kv_cache_blocks(accel.memory_bytes, max_num_batched_tokens, b.block_size),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        accelerator=accelerator or b.accelerator,  # the key the price table uses
        source=f"estimate: the H100 fit scaled by {accel.name} / H100 peak specs "
        f"(bandwidth x{bw:.2f}, bf16 FLOP/s x{fl:.2f}; {accel.source})",
    )


# Estimates, not measurements (see estimate_profile). L4: decode about 11x and prefill about 8x slower
# than the H100, 2,036 blocks of KV; its smaller batch limits are the ones used for it before.
L4_LLAMA3_8B = estimate_profile(
    "l4-llama3-8b", L4, accelerator="l4", max_num_seqs=128, max_num_batched_tokens=4096
)
# TPU v6e, one chip: decode about 2x slower (half the H100's bandwidth), prefill about the same.
TPU_V6E_LLAMA3_8B = estimate_profile("tpu-v6e-llama3-8b", TPU_V6E, accelerator="tpu-v6e")

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
    p.name: p for p in (H100_LLAMA3_8B, L4_LLAMA3_8B, TPU_V6E_LLAMA3_8B, H100X4_LLAMA3_70B, NULL_PROFILE)
}
PROFILES["h100"] = H100_LLAMA3_8B
PROFILES["l4"] = L4_LLAMA3_8B
PROFILES["v6e"] = TPU_V6E_LLAMA3_8B


def get_profile(name: str) -> SimProfile:
    """Look a profile up by name, with a clear error listing the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown simulator profile {name!r}; known: {', '.join(sorted(PROFILES))}"
        ) from None
