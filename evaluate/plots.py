"""The PNG plots of `sae eval`: the sparsity-fidelity trade-offs across SAEs, NMSE and CE degradation vs L0
with one line per architecture and setting (BatchTopK paper, Figures 1-2), the per-token L0 distribution (its Figure 3)
and the latent-frequency histogram.

Figure functions take plain data (lists and dicts, no eval objects) and return a matplotlib Figure drawn with
the Agg canvas, no pyplot state; `plot_figures` shapes eval reports into that data, `save_plots` writes PNGs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from sae_cache.evaluate.metrics import DENSE_FREQUENCY

L0_LABEL = "L0 (active latents per token)"
LOG_X_SPREAD = 4  # L0 goes on a log axis once the SAEs' L0s span at least this factor
FREQUENCY_BINS = 40


def _figure() -> tuple[Figure, object]:
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def curve_labels(reports: list[dict]) -> list[str]:
    """The line each SAE belongs to: its architecture, plus the run-name tags (train/sweep.py) in which SAEs of that
    architecture differ, other than the first, its sparsity knob (k, L1, L0), which runs along the line. So a sweep
    of k at two widths, or over aux_k, draws one line per width or aux_k instead of a zig-zag through all of
    them. Names that do not follow `<arch>-<tags>` (SAEs trained elsewhere) go on their architecture's line."""
    tags = [r["sae"].split("-")[2:] if r["sae"].startswith(r["arch"] + "-") else None for r in reports]
    labels = []
    for r, own in zip(reports, tags):
        peers = [t for q, t in zip(reports, tags) if q["arch"] == r["arch"] and t is not None]
        if own is None or any(len(t) != len(own) for t in peers):
            labels.append(r["arch"])
            continue
        varied = [tag for i, tag in enumerate(own) if len({t[i] for t in peers}) > 1]
        labels.append(" ".join([r["arch"], *varied]))
    return labels


def by_arch(reports: list[dict], metric: str) -> dict[str, tuple[list[float], list[float]]]:
    """{line label: (L0s ascending, `metric` at each)}: one line per architecture and setting (curve_labels); SAEs
    without a value are left out."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    labelled = sorted(zip(curve_labels(reports), reports), key=lambda pair: pair[1]["metrics"]["l0"])
    for label, r in labelled:
        if r["metrics"][metric] is not None:
            l0s, values = series.setdefault(label, ([], []))
            l0s.append(r["metrics"]["l0"])
            values.append(r["metrics"][metric])
    return series


def tradeoff_figure(series: dict[str, tuple[list[float], list[float]]], ylabel: str, title: str) -> Figure:
    """`series` = {arch: (L0s, values)}, drawn as one line with markers per architecture."""
    fig, ax = _figure()
    for arch, (l0s, values) in series.items():
        ax.plot(l0s, values, marker="o", label=arch)
    all_l0 = [x for l0s, _ in series.values() for x in l0s]
    if all_l0 and min(all_l0) > 0 and max(all_l0) / min(all_l0) >= LOG_X_SPREAD:
        ax.set_xscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")  # 16, 32, 64 rather than 1.6 x 10^1
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel(L0_LABEL)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="architecture")
    return fig


def l0_histogram_figure(histograms: dict[str, list[int]]) -> Figure:
    """`histograms` = {SAE: counts}, counts[l] = tokens with exactly l active latents; drawn as the fraction of
    tokens per L0 value, one step line per SAE."""
    fig, ax = _figure()
    for name, counts in histograms.items():
        counts = np.asarray(counts, dtype=float)
        ax.stairs(counts / counts.sum(), np.arange(len(counts) + 1) - 0.5, label=name)
    ax.set_xlabel("L0 of a token (active latents)")
    ax.set_ylabel("fraction of tokens")
    ax.set_title("Per-token L0")
    ax.legend(fontsize="small")
    return fig


def latent_frequency_figure(frequencies: dict[str, list[float]], n_tokens: int) -> Figure:
    """`frequencies` = {SAE: fraction of the n_tokens evaluated tokens each latent was active on}; histogram of
    log10 frequency over the live latents (the dead, frequency 0, are counted in the legend)."""
    fig, ax = _figure()
    edges = np.linspace(math.log10(1 / n_tokens), 0, FREQUENCY_BINS + 1)
    for name, frequency in frequencies.items():
        frequency = np.asarray(frequency)
        counts, _ = np.histogram(np.log10(frequency[frequency > 0]), bins=edges)
        ax.stairs(counts, edges, label=f"{name} ({int((frequency == 0).sum())} dead)")
    ax.axvline(math.log10(DENSE_FREQUENCY), color="grey", linestyle=":", label="dense above")
    ax.set_xlabel("log10 latent frequency (fraction of tokens a latent is active on)")
    ax.set_ylabel("latents")
    ax.set_yscale("symlog", linthresh=1)  # a few very rare or very dense latents stay visible next to the bulk
    ax.set_title("Latent frequency")
    ax.legend(fontsize="small")
    return fig


def plot_figures(reports: list[dict]) -> dict[str, Figure]:
    """Every plot of an evaluation, from its SAEs' reports (the content of their eval.json)."""
    return {
        "nmse_vs_l0": tradeoff_figure(by_arch(reports, "nmse"), "NMSE = E‖x − x̂‖² / E‖x − E[x]‖²",
                                      "Reconstruction vs sparsity"),
        "ce_degradation_vs_l0": tradeoff_figure(by_arch(reports, "ce_degradation"),
                                                "CE degradation (nats/token, spliced − clean)",
                                                "Downstream loss vs sparsity"),
        "l0_histogram": l0_histogram_figure({r["sae"]: r["l0_histogram"] for r in reports}),
        "latent_frequency": latent_frequency_figure({r["sae"]: r["latent_frequency"] for r in reports},
                                                    reports[0]["metrics"]["tokens"]),
    }


def save_plots(reports: list[dict], directory: Path) -> dict[str, Path]:
    """Write each plot as directory/<name>.png; returns {name: path}."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in plot_figures(reports).items():
        paths[name] = directory / f"{name}.png"
        fig.savefig(paths[name], dpi=120)
    return paths
