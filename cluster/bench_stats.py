"""The numbers of a ``pdserve bench`` run: latency statistics, throughput, goodput, a plot."""

from __future__ import annotations

import statistics
from typing import Any


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return 0.0
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def describe(seconds: list[float], percentiles: list[float]) -> dict[str, float]:
    ms = [x * 1000.0 for x in seconds]
    out = {"mean": statistics.fmean(ms) if ms else 0.0,
           "median": statistics.median(ms) if ms else 0.0,
           "std": statistics.pstdev(ms) if len(ms) > 1 else 0.0}
    for p in percentiles:
        out[f"p{p:g}"] = percentile(ms, p)
    return out


def tpot(r: Any) -> float | None:
    if r.output_tokens > 1:
        return (r.latency - r.ttft) / (r.output_tokens - 1)
    return None


def summarize(results: list[Any], duration: float, percentiles: list[float],
              slos: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    tpots = [t for r in ok if (t := tpot(r)) is not None]
    itls = [x for r in ok for x in r.itl]
    inp = sum(r.prompt_tokens for r in ok)
    out = sum(r.output_tokens for r in ok)
    summary: dict[str, Any] = {
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:20],
        "total_input_tokens": inp, "total_output_tokens": out,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out / duration if duration else 0.0,
        "total_token_throughput": (inp + out) / duration if duration else 0.0,
        "ttft": describe([r.ttft for r in ok], percentiles),
        "tpot": describe(tpots, percentiles),
        "itl": describe(itls, percentiles),
        "e2el": describe([r.latency for r in ok], percentiles),
        "goodput": None, "slos_ms": {k: v * 1000 for k, v in slos.items()},
    }
    if slos:
        good = 0
        for r in ok:
            t = tpot(r) or 0.0
            if (r.ttft <= slos.get("ttft", float("inf")) and t <= slos.get("tpot", float("inf"))
                    and r.latency <= slos.get("e2el", float("inf"))):
                good += 1
        summary["goodput"] = good / duration if duration else 0.0
    return summary


def write_plot(summary: dict[str, Any], path: str) -> bool:
    """Histograms of TTFT, TPOT, ITL and E2E latency; False if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    reqs = [r for r in summary["requests"] if r["ok"]]
    series = {
        "TTFT (ms)": [r["ttft"] * 1000 for r in reqs],
        "TPOT (ms)": [(r["latency"] - r["ttft"]) * 1000 / (r["output_tokens"] - 1)
                      for r in reqs if r["output_tokens"] > 1],
        "ITL (ms)": [x * 1000 for r in reqs for x in r["itl"]],
        "E2E latency (ms)": [r["latency"] * 1000 for r in reqs],
    }
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, values) in zip(axes.flat, series.items(), strict=True):
        ax.hist(values, bins=30)
        ax.set_title(name)
        ax.set_ylabel("requests" if "ITL" not in name else "tokens")
    fig.suptitle(f"pdserve bench: {summary['completed']} requests, "
                 f"{summary['request_throughput']:.2f} req/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
