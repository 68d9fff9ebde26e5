"""What a search prints and draws: a table in seconds and a Pareto plot (PNG)."""
from __future__ import annotations

from braid.planner.search import Outcome

HEADERS = ("deployment", "cards", "TTFT p50 s", "TTFT p90 s", "TTFT p99 s", "TPOT p50 s", "TPOT p90 s",
           "TPOT p99 s", "tok/s", "tok/s/card")


def row(o: Outcome) -> list[str]:
    return [o.dep.label(), str(o.dep.cards)] + [f"{x:.3f}" for x in (
        o.ttft_p50, o.ttft_p90, o.ttft_p99, o.tpot_p50, o.tpot_p90, o.tpot_p99)] + [
        f"{o.throughput:.1f}", f"{o.per_card:.2f}"]


def table(outcomes: list[Outcome]) -> str:
    cells = [list(HEADERS)] + [row(o) for o in outcomes]
    widths = [max(len(r[i]) for r in cells) for i in range(len(HEADERS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary(o: Outcome, ttft_slo: float, tpot_slo: float) -> str:
    d = o.dep
    return "\n".join([
        f"recommended: {d.label()} on {d.cards} cards",
        f"  prefill: {d.n_p} instance(s) of tp {d.p.tp} x pcp {d.p.pcp}"
        + (f", ep {d.p.ep}" if d.p.ep > 1 else "") + f" ({d.p.world} cards each)",
        f"  decode:  {d.n_d} instance(s) of tp {d.d.tp}, dcp {d.d.dcp}"
        + (f", ep {d.d.ep}" if d.d.ep > 1 else "") + f" ({d.d.world} cards each)",
        f"  TTFT p50 {o.ttft_p50:.3f} s, p90 {o.ttft_p90:.3f} s, p99 {o.ttft_p99:.3f} s (SLO p90 {ttft_slo:g} s)",
        f"  TPOT p50 {o.tpot_p50:.4f} s, p90 {o.tpot_p90:.4f} s, p99 {o.tpot_p99:.4f} s (SLO p90 {tpot_slo:g} s)",
        f"  throughput {o.throughput:.1f} output tok/s, {o.per_card:.2f} per card",
    ])


def plot(outcomes: list[Outcome], frontier: list[Outcome], best: Outcome | None, path: str,
         ttft_slo: float, tpot_slo: float) -> None:
    """Throughput per card against p90 TTFT and p90 TPOT; SLO-meeting points blue, frontier ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    ok = [o for o in outcomes if o.meets(ttft_slo, tpot_slo)]
    bad = [o for o in outcomes if not o.meets(ttft_slo, tpot_slo)]
    for ax, key, slo, name in ((axes[0], "ttft_p90", ttft_slo, "TTFT p90 (s)"), (axes[1], "tpot_p90", tpot_slo,
                                                                                  "TPOT p90 (s)")):
        ax.scatter([getattr(o, key) for o in bad], [o.per_card for o in bad], c="lightgray", s=16,
                   label="misses an SLO")
        ax.scatter([getattr(o, key) for o in ok], [o.per_card for o in ok], c="tab:blue", s=16,
                   label="meets both SLOs")
        ax.scatter([getattr(o, key) for o in frontier], [o.per_card for o in frontier], facecolors="none",
                   edgecolors="tab:orange", s=70, label="Pareto frontier")
        if best is not None:
            ax.scatter([getattr(best, key)], [best.per_card], marker="*", s=260, c="tab:red", zorder=5,
                       label=f"recommended: {best.dep.label()}")
        ax.axvline(slo, c="gray", lw=0.8, ls=":")
        ax.set_xlabel(name)
    axes[0].set_ylabel("output tokens/s per card")
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle("braid plan: simulated deployments (dotted: the SLOs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
