"""The load driver's report: statistics of a replay (loadtests.driver), as text, a sweep plot and JSON rows."""

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loadtests.driver import RequestRecord


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    mean = sum(values) / len(values) if values else None
    return {"mean": mean, "p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99)}


def summarize(records: Sequence["RequestRecord"], elapsed: float, slo_ttft: float) -> dict[str, Any]:
    """The report of one replay (see loadtests.driver's docstring); plain JSON-able values, None where undefined."""
    ok = [r for r in records if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    duration = max(elapsed, 1e-9)
    met = sum(1 for r in ok if r.ttft is not None and r.ttft <= slo_ttft)
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": dict(Counter(r.error_key() for r in records if not r.ok)),
        "duration_s": elapsed,
        "throughput_rps": len(ok) / duration,
        "output_tokens": tokens,
        "output_tps": tokens / duration,
        "ttft_s": distribution([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": distribution([r.tpot for r in ok if r.tpot is not None]),
        "itl_s": distribution([gap for r in ok for gap in r.itls]),
        "latency_s": distribution([r.latency for r in ok if r.latency is not None]),
        "slo_ttft_s": slo_ttft,
        "slo_attainment": met / len(records) if records else None,
        "max_send_lag_s": max((r.sent - r.scheduled for r in records), default=0.0),
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def format_summary(s: dict[str, Any]) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items())) or "none"
    lines = [
        f"requests {s['ok']}/{s['requests']} ok in {s['duration_s']:.1f} s (offered {s['offered_rate']:.2f} req/s); "
        f"errors: {errors}",
        f"throughput {s['throughput_rps']:.2f} req/s, {s['output_tps']:.1f} output tokens/s "
        f"({s['output_tokens']} tokens)",
        f"{'ms':<12}{'mean':>8}{'p50':>8}{'p90':>8}{'p99':>8}",
    ]
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("latency_s", "latency")):
        d = s[key]
        lines.append(f"{label:<12}{_ms(d['mean']):>8}{_ms(d['p50']):>8}{_ms(d['p90']):>8}{_ms(d['p99']):>8}")
    attained = "-" if s["slo_attainment"] is None else f"{100 * s['slo_attainment']:.1f}%"
    lines.append(f"SLO TTFT <= {s['slo_ttft_s']:g} s: {attained}; max send lag {_ms(s['max_send_lag_s'])} ms")
    return "\n".join(lines)


def format_sweep(summaries: Sequence[dict[str, Any]]) -> str:
    head = (f"{'rate':>6}{'ok':>9}{'req/s':>8}{'tok/s':>8}{'TTFT p50':>10}{'p90':>8}{'p99':>8}"
            f"{'TPOT p50':>10}{'p90':>8}{'p99':>8}{'mean':>8}{'SLO':>7}  errors")  # fmt: skip
    lines = [head + "   (latencies in ms)"]
    for s in summaries:
        t, p = s["ttft_s"], s["tpot_s"]
        slo = "-" if s["slo_attainment"] is None else f"{100 * s['slo_attainment']:.0f}%"
        errors = ", ".join(f"{k}:{v}" for k, v in sorted(s["errors"].items())) or "-"
        lines.append(f"{s['rate']:>6g}{s['ok']:>5}/{s['requests']:<3}{s['throughput_rps']:>8.2f}{s['output_tps']:>8.1f}"
                     f"{_ms(t['p50']):>10}{_ms(t['p90']):>8}{_ms(t['p99']):>8}{_ms(p['p50']):>10}{_ms(p['p90']):>8}"
                     f"{_ms(p['p99']):>8}{_ms(p['mean']):>8}{slo:>7}  {errors}")  # fmt: skip
    return "\n".join(lines)


def plot_sweep(summaries: Sequence[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Write a PNG of TTFT p50/p99 and mean TPOT vs request rate; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: render to a file only
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rates = [s["rate"] for s in summaries]

    def series(key: str, stat: str) -> list[float]:
        return [math.nan if s[key][stat] is None else s[key][stat] * 1000 for s in summaries]

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(rates, series("ttft_s", "p50"), "o-", label="TTFT p50")
    left.plot(rates, series("ttft_s", "p99"), "s--", label="TTFT p99")
    left.set(xlabel="request rate (req/s)", ylabel="ms", title="time to first token")
    right.plot(rates, series("tpot_s", "mean"), "o-", label="TPOT mean")
    right.set(xlabel="request rate (req/s)", ylabel="ms", title="time per output token")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def request_row(r: "RequestRecord") -> dict[str, Any]:
    return {"index": r.index, "adapter": r.adapter, "scheduled": r.scheduled, "sent": r.sent, "status": r.status,
            "error": r.error, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.output_tokens, "max_new_tokens": r.max_new_tokens, "ttft": r.ttft, "tpot": r.tpot,
            "latency": r.latency}  # fmt: skip
