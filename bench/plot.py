"""The benchmark's latency plot: p50 / p99 / p99.9 against offered rate, one colour per target."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # no display: render straight to PNG

import matplotlib.pyplot as plt  # after the backend is chosen
import matplotlib.ticker

if TYPE_CHECKING:
    from bench.harness import BenchResults

COLOURS = {"authsrv": "tab:blue", "baseline": "tab:grey", "external-5ms": "tab:green", "external-timeout": "tab:orange", "postgres": "tab:purple"}
PERCENTILES = (("p50_ms", "p50", "-"), ("p99_ms", "p99", "--"), ("p999_ms", "p99.9", ":"))
FIGURE_SIZE_IN = (9.0, 5.5)
DPI = 110


def write_latency_plot(results: BenchResults, path: Path) -> None:
    figure, axes = plt.subplots(figsize=FIGURE_SIZE_IN, dpi=DPI)
    try:
        plotted = False
        for name, target in results.targets.items():
            if not target.steps:
                continue
            rates = [step.offered_rate_per_s for step in target.steps]
            for attribute, label, style in PERCENTILES:
                values = [max(getattr(step, attribute), 0.001) for step in target.steps]
                axes.plot(rates, values, style, marker="o", color=COLOURS.get(name, "tab:red"),
                          label=f"{name} {label}")  # fmt: skip
                plotted = True
        axes.set_yscale("log")
        axes.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axes.set_xlabel("offered rate (requests/s, open loop)")
        axes.set_ylabel("latency (ms, from intended send)")
        machine = results.machine
        axes.set_title(f"ISO 8583 latency vs offered rate - {machine.cpu_model}, {machine.cores} cores", fontsize=9)
        axes.grid(True, which="both", alpha=0.3)
        if plotted:
            axes.legend(fontsize=8)
        else:
            axes.text(0.5, 0.5, "no steps measured", transform=axes.transAxes, ha="center")
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
