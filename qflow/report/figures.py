"""The report's figures, drawn by matplotlib (Agg: no display) and returned as PNG bytes.

Colours are the Okabe–Ito palette, distinguishable without colour vision; every axis is
labelled with its unit, and lines differ by style as well as colour so that the figures
also read in grey print.
"""

from __future__ import annotations

import io
import itertools

from qflow.oscillation_plot import COLOURS, STYLES

#: tensors per histogram figure (a grid of small plots)
HISTOGRAMS_PER_FIGURE = 12
RANGE_COLOUR, OUTSIDE_COLOUR = COLOURS[2], COLOURS[3]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _png(fig, *, tight: bool = True) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight" if tight else None)
    _pyplot().close(fig)
    return buffer.getvalue()


def training_figure(float_history: list[dict], qat_history: list[dict]) -> bytes | None:
    """Loss per epoch, the float phase then each QAT phase, and test accuracy where the
    rows have it; None without any epoch."""
    rows = [("float", r) for r in float_history] + [(r.get("phase", "QAT"), r)
                                                     for r in qat_history]
    if not rows:
        return None
    plt = _pyplot()
    accuracy = any("val_accuracy" in r for _, r in rows)
    fig, axes = plt.subplots(1, 2 if accuracy else 1, figsize=(9.0 if accuracy else 6.0, 3.4),
                             dpi=110, squeeze=False)
    phases = list(dict.fromkeys(phase for phase, _ in rows))
    for column, key, label in (((0, "loss", "training loss (cross-entropy)"),)
                               + (((1, "val_accuracy", "test accuracy (%)"),) if accuracy
                                  else ())):
        ax = axes[0][column]
        for i, phase in enumerate(phases):
            points = [(n + 1, r[key]) for n, (p, r) in enumerate(rows) if p == phase and key in r]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3,
                        color=COLOURS[i % len(COLOURS)], linestyle=STYLES[i % len(STYLES)],
                        label=phase)
        ax.set_xlabel("epoch (all phases in order)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    fig.tight_layout()
    return _png(fig)


def histogram_figures(rows: list[dict]) -> list[bytes]:
    """Histograms of the values arriving at each quantizer, the representable range
    shaded, values outside it in the second colour; up to 12 tensors per figure."""
    plt = _pyplot()
    figures = []
    for start in range(0, len(rows), HISTOGRAMS_PER_FIGURE):
        chunk = rows[start:start + HISTOGRAMS_PER_FIGURE]
        columns = min(3, len(chunk))
        lines = -(-len(chunk) // columns)
        fig, axes = plt.subplots(lines, columns, figsize=(3.3 * columns, 2.5 * lines), dpi=100,
                                 squeeze=False)
        for ax in axes.ravel()[len(chunk):]:
            ax.set_visible(False)
        for ax, row in zip(axes.ravel(), chunk, strict=False):
            _histogram(ax, row)
        # fixed margins: tight_layout measures every tick label and costs seconds
        fig.subplots_adjust(left=0.08, right=0.97, bottom=0.5 / (2.5 * lines) + 0.04,
                            top=1 - 0.3 / (2.5 * lines), wspace=0.38, hspace=0.85)
        figures.append(_png(fig, tight=False))
    return figures


def _histogram(ax, row: dict) -> None:
    counts, edges = row["histogram"]["counts"], row["histogram"]["edges"]
    low, high = row["range"]
    inside = [c if low <= (a + b) / 2 <= high else 0
              for c, (a, b) in zip(counts, itertools.pairwise(edges), strict=True)]
    outside = [c - i for c, i in zip(counts, inside, strict=True)]
    ax.axvspan(low, high, color=RANGE_COLOUR, alpha=0.12, linewidth=0)
    # two filled step outlines: a patch per bin (ax.bar) draws ten times slower
    ax.stairs(inside, edges, fill=True, color=RANGE_COLOUR, linewidth=0)
    if any(outside):
        ax.stairs(outside, edges, fill=True, color=OUTSIDE_COLOUR, linewidth=0)
    ax.set_yscale("log" if max(counts, default=0) > 0 else "linear")
    # a placed label: set_title measures the tick labels to position itself (slow)
    ax.text(0.0, 1.03, f"{row['tensor']}\n{row['type']}", transform=ax.transAxes, fontsize=6.5,
            va="bottom", linespacing=1.1)
    ax.set_xlabel("value (real units)", fontsize=7)
    ax.set_ylabel("count", fontsize=7)
    ax.tick_params(labelsize=6)
    said = ", ".join(f"{name} {round(row[name] * row['values']):,} ({row[name]:.3%})"
                     for name in ("clipped", "zeroed", "wrapped") if row[name]) or "none outside"
    ax.text(0.98, 0.95, said, transform=ax.transAxes, ha="right", va="top", fontsize=6)


def channel_strip_figure(formats: list[dict]) -> bytes | None:
    """One strip per per-channel tensor: each channel's integer width I as a coloured
    cell (a sequential colour map that reads in grey), the value written in it where
    the cells are wide enough; None when no tensor is per channel."""
    strips = [r for r in formats if len(r.get("int_widths") or ()) > 1]
    if not strips:
        return None
    plt = _pyplot()
    low = min(min(r["int_widths"]) for r in strips)
    high = max(max(r["int_widths"]) for r in strips)
    fig, axes = plt.subplots(len(strips), 1, figsize=(7.5, 0.55 * len(strips) + 0.9), dpi=110,
                             squeeze=False)
    for ax, row in zip(axes[:, 0], strips, strict=True):
        widths = row["int_widths"]
        image = ax.imshow([widths], aspect="auto", cmap="viridis", vmin=low,
                          vmax=max(high, low + 1), interpolation="nearest")
        if len(widths) <= 32:
            for channel, width in enumerate(widths):
                ax.text(channel, 0, str(width), ha="center", va="center", fontsize=6,
                        color="white" if width < (low + high) / 2 else "black")
        ax.set_yticks([0], [f"{row['layer']} {row['tensor']}"], fontsize=7)
        ax.tick_params(axis="x", labelsize=6)
    axes[-1, 0].set_xlabel("output channel")
    fig.subplots_adjust(left=0.28, right=0.88, top=0.95, bottom=0.6 / (0.55 * len(strips) + 0.9),
                        hspace=0.9)
    bar = fig.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.04, pad=0.02)
    bar.set_label("integer width I (bits)", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    return _png(fig, tight=False)


def resource_figure(estimate: dict) -> bytes | None:
    """Bars of the estimated DSP, LUT, FF and BRAM use in percent of the board's budget."""
    budget, totals = estimate.get("budget") or {}, estimate.get("totals") or {}
    kinds = [k for k in ("dsp", "lut", "ff", "bram36") if budget.get(k)]
    if not kinds:
        return None
    plt = _pyplot()
    percent = [100.0 * totals.get(k, 0) / budget[k] for k in kinds]
    fig, ax = plt.subplots(figsize=(6.0, 2.6), dpi=110)
    bars = ax.barh([k.upper().replace("BRAM36", "BRAM") for k in kinds], percent,
                   color=[COLOURS[0] if p <= 100 else OUTSIDE_COLOUR for p in percent])
    ax.axvline(100, color="black", linestyle="--", linewidth=1)
    for bar, p, k in zip(bars, percent, kinds, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f" {p:.0f}% ({totals.get(k, 0):,} of {budget[k]:,})", va="center", fontsize=7)
    ax.set_xlabel("estimated use, % of the board (dashed: 100%)")
    ax.set_xlim(0, max(110.0, max(percent) * 1.35))
    fig.tight_layout()
    return _png(fig)
