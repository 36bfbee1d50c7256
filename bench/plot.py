"""The benchmark's latency plot: one line per system against offered rate, p99 and p50 side by side,
with the p99 bound of the knee search (`BenchConfig.sustain_p99_ms`) dashed on the p99 panel."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # no display: render straight to PNG

import matplotlib.pyplot as plt  # after the backend is chosen
import matplotlib.ticker

from bench.harness import p99_bound_ms

if TYPE_CHECKING:
    from bench.harness import BenchResults

COLOURS = {"authsrv": "tab:blue", "floor": "tab:grey", "postgres": "tab:purple", "postgres-fn": "tab:brown",
           "external-5ms": "tab:green", "external-timeout": "tab:orange"}  # fmt: skip
ROLES = {"floor": "codec + transport only"}  # the baseline's role comes from BenchResults.baseline
PANELS = (("p99_ms", "p99"), ("p50_ms", "p50"))
FIGURE_SIZE_IN = (12.0, 5.5)
DPI = 110
LATENCY_MS_MIN = 0.001  # log axis: a zero would vanish
BOUND_COLOUR = "black"  # not a system colour (unknown systems are drawn in tab:red)


def system_label(name: str, baseline: str) -> str:
    role = "baseline" if name == baseline else ROLES.get(name)
    return f"{name} ({role})" if role else name


def p99_bound_label(bound_ms: float) -> str:
    return f"p99 bound {bound_ms:g} ms"


def write_latency_plot(results: BenchResults, path: Path) -> None:
    figure = latency_figure(results)
    try:
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)


def latency_figure(results: BenchResults) -> matplotlib.figure.Figure:
    """The figure `write_latency_plot` saves (the caller closes it)."""
    figure, panels = plt.subplots(1, len(PANELS), figsize=FIGURE_SIZE_IN, dpi=DPI, sharey=True)
    try:
        plotted = False
        for axes, (attribute, label) in zip(panels, PANELS, strict=True):
            for name, target in results.targets.items():
                if not target.steps:
                    continue
                rates = [step.offered_rate_per_s for step in target.steps]
                values = [max(getattr(step, attribute), LATENCY_MS_MIN) for step in target.steps]
                axes.plot(rates, values, "-", marker="o", color=COLOURS.get(name, "tab:red"),
                          label=system_label(name, results.baseline))  # fmt: skip
                plotted = True
            if attribute == "p99_ms":  # the knee: the highest rate whose p99 stays under this line
                bound = p99_bound_ms(results)
                axes.axhline(bound, linestyle="--", linewidth=1.0, color=BOUND_COLOUR, label=p99_bound_label(bound))
            axes.set_yscale("log")
            axes.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            axes.set_xlabel("offered rate (requests/s, open loop)")
            axes.set_ylabel(f"{label} latency (ms, from intended send)")
            axes.set_title(f"{label} per system", fontsize=9)
            axes.grid(True, which="both", alpha=0.3)
            if plotted or attribute == "p99_ms":
                axes.legend(fontsize=8)
            if not plotted:
                axes.text(0.5, 0.5, "no steps measured", transform=axes.transAxes, ha="center")
        machine = results.machine
        figure.suptitle(f"ISO 8583 latency vs offered rate - {machine.cpu_model}, {machine.cores} cores", fontsize=9)
        figure.tight_layout()
    except BaseException:
        plt.close(figure)
        raise
    return figure
