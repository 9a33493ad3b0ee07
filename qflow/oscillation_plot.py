"""The oscillation figure of a run: the fraction of oscillating weights per layer over
the QAT epochs (``oscillation.png``, written by ``qflow quantize``)."""

from __future__ import annotations

from pathlib import Path

#: Okabe–Ito colours, then line styles: distinguishable without colour vision
COLOURS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442")
STYLES = ("-", "--", ":", "-.")


def oscillation_figure(history: list[dict], path: str | Path, *, threshold: float,
                       most: int = 8) -> Path | None:
    """Write the figure of ``history`` (``metrics.json``'s ``qat_history`` rows, each with
    ``"oscillation": {"fraction", "layers"}``) to ``path``; None (nothing written) when
    no row has it. The ``most`` layers with the highest final fraction get their own line,
    the model's total a thick black one; phases (QAT, CGA, ...) are marked where they
    change.

    >>> import tempfile, os
    >>> rows = [{"phase": "QAT", "oscillation": {"fraction": f, "layers": {"fc": f}}}
    ...         for f in (0.2, 0.1, 0.05)]
    >>> with tempfile.TemporaryDirectory() as d:
    ...     out = oscillation_figure(rows, os.path.join(d, "o.png"), threshold=0.005)
    ...     out.stat().st_size > 1000
    True
    """
    rows = [r for r in history if "oscillation" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = list(range(1, len(rows) + 1))
    final = rows[-1]["oscillation"]["layers"]
    layers = sorted(final, key=lambda n: -final[n])[:most]
    fig, ax = plt.subplots(figsize=(8.0, 4.2), dpi=120)
    try:
        for i, name in enumerate(layers):
            ax.plot(epochs, [100 * r["oscillation"]["layers"].get(name, 0.0) for r in rows],
                    color=COLOURS[i % len(COLOURS)], linestyle=STYLES[i // len(COLOURS) % 4],
                    linewidth=1.2, label=name)
        ax.plot(epochs, [100 * r["oscillation"]["fraction"] for r in rows], color="#000000",
                linewidth=2.4, label="all layers")
        for i in range(1, len(rows)):
            if rows[i].get("phase") != rows[i - 1].get("phase"):
                ax.axvline(i + 0.5, color="#999999", linestyle="--", linewidth=1)
                ax.annotate(str(rows[i].get("phase")), (i + 0.6, 0.02),
                            xycoords=("data", "axes fraction"), fontsize=8)
        ax.set_xlabel("QAT epoch")
        ax.set_ylabel(f"oscillating weights (%), frequency > {threshold:g}")
        ax.set_title("Weight oscillation per layer")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return Path(path)
