"""Plots of benchmark results: latency percentiles against throughput, goodput against offered load,
and per-tenant goodput."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ingate.bench.stats import has_tenants, isolation


def plot(results: list[dict[str, Any]], out: Path) -> Path:
    """PNG: TTFT and e2e percentiles against achieved throughput, one line per system, and goodput
    against offered load."""
    if results and all(has_tenants(r) for r in results):
        return plot_tenants(results, out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    metrics = [
        ("ttft_p50", "TTFT p50 (s)"),
        ("ttft_p90", "TTFT p90 (s)"),
        ("ttft_p99", "TTFT p99 (s)"),
        ("e2e_p50", "e2e p50 (s)"),
        ("e2e_p99", "e2e p99 (s)"),
    ]
    for res in results:
        for sysres in res["systems"]:
            stages = sysres.get("stages") or []
            if not stages:
                continue
            label = sysres["name"] if len(results) == 1 else f"{res['workload']['name']}/{sysres['name']}"
            x = [st["summary"]["throughput_rps"] for st in stages]
            for ax, (key, title) in zip(axes.flat, metrics, strict=False):
                y = [st["summary"][key] for st in stages]
                pts = [(a, b) for a, b in zip(x, y, strict=True) if b is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
                ax.set_title(title)
                ax.set_xlabel("achieved throughput (req/s)")
            offered = [st["rate"] if st["rate"] is not None else st["concurrency"] for st in stages]
            axes.flat[5].plot(
                offered, [st["summary"]["goodput_rps"] for st in stages], marker="o", label=label
            )
    axes.flat[5].set_title("goodput (req/s meeting SLO)")
    axes.flat[5].set_xlabel("offered load")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_tenants(results: list[dict[str, Any]], out: Path) -> Path:
    """PNG for multi-tenant workloads: each isolated tenant's latency alone vs loaded, per system, and
    per-tenant outcomes (served, 429, 503) of the loaded stages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5.5))
    keys = ("ttft_p50", "ttft_p99", "e2e_p50", "e2e_p99")
    isos = [iso for res in results for iso in isolation(res)]
    width = 0.8 / max(1, 2 * len(isos))
    for n, iso in enumerate(isos):
        for m, which in enumerate(("alone", "loaded")):
            vals = [iso[which][k] or 0.0 for k in keys]
            xs = [i + (2 * n + m) * width for i in range(len(keys))]
            ax1.bar(xs, vals, width, label=f"{iso['system']} {iso['tenant']} {which}")
    ax1.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], [k.replace("_", " ") for k in keys])
    ax1.set_yscale("log")
    ax1.set_ylabel("seconds (log)")
    ax1.set_title("tenant latency: alone vs under load")
    ax1.legend(fontsize=8)
    labels, served, shed, expired = [], [], [], []
    for res in results:
        for sysres in res["systems"]:
            for st in sysres.get("stages") or []:
                ten = st.get("tenants") or {}
                if len(ten) < 2:
                    continue
                for name, s in ten.items():
                    labels.append(f"{sysres['name']}\n{name}")
                    served.append(s["ok"])
                    shed.append(s["status"].get("429", 0))
                    expired.append(s["status"].get("503", 0))
    xs = list(range(len(labels)))
    ax2.bar(xs, served, label="200 served")
    ax2.bar(xs, shed, bottom=served, label="429 shed / queue full")
    ax2.bar(xs, expired, bottom=[a + b for a, b in zip(served, shed, strict=True)], label="503")
    ax2.set_xticks(xs, labels, fontsize=8)
    ax2.set_ylabel("requests")
    ax2.set_title("loaded stage: outcome per tenant")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3, axis="y")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
