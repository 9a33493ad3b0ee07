"""HAWQ's Pareto-front figure: ΣΩ against the budgeted cost, with the chosen point and
the uniform widths marked (``pareto.png`` in a ``qflow quantize --method hawq`` run)."""

from __future__ import annotations

from pathlib import Path

#: Okabe–Ito colours (readable with every common colour-vision deficiency)
FRONT, UNIFORM, CHOSEN, BUDGET = "#0072B2", "#E69F00", "#D55E00", "#999999"


def pareto_figure(report: dict, path: str | Path) -> Path:
    """Write the PNG of a HAWQ report (``hawq.json``'s data) to ``path``; returns it.

    The x axis is the report's Pareto quantity (the first fraction budget, else size) as
    a fraction of the all-8-bit model's; the y axis ΣΩ (log scale when every point is
    positive). The frontier is drawn as steps, the uniform widths as labelled squares,
    the chosen allocation as a star and the budget as a dashed line.

    >>> import tempfile, os
    >>> report = {"pareto": {"quantity": "size", "points": [[0.4, 3.0], [0.5, 1.0]]},
    ...           "uniform": [{"bits": 4, "omega": 2.0, "size": 0.5}],
    ...           "costs": {"size": {"fraction": 0.45, "budget": 0.5}}, "omega": 1.5}
    >>> with tempfile.TemporaryDirectory() as d:
    ...     out = pareto_figure(report, os.path.join(d, "pareto.png"))
    ...     out.stat().st_size > 1000
    True
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    quantity = report["pareto"]["quantity"]
    front = sorted(report["pareto"]["points"])
    uniform = report["uniform"]
    chosen = (report["costs"][quantity]["fraction"], report["omega"])
    budget = report["costs"][quantity].get("budget")
    omegas = [o for _, o in front] + [u["omega"] for u in uniform] + [chosen[1]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    try:
        if front:
            ax.step([c for c, _ in front], [o for _, o in front], where="post", color=FRONT,
                    marker=".", markersize=4, linewidth=1.2, label="Pareto front (ΣΩ, cost)")
        for u in uniform:
            ax.plot(u[quantity], u["omega"], "s", color=UNIFORM, markersize=7)
            ax.annotate(f"w{u['bits']}", (u[quantity], u["omega"]), textcoords="offset points",
                        xytext=(6, 4), fontsize=9)
        ax.plot([], [], "s", color=UNIFORM, label="uniform widths")
        ax.plot(*chosen, "*", color=CHOSEN, markersize=14, label="chosen")
        if budget is not None:
            ax.axvline(budget, color=BUDGET, linestyle="--", linewidth=1,
                       label=f"budget {budget:g}")
        if all(o > 0 for o in omegas):
            ax.set_yscale("log")
        ax.set_xlabel(f"{quantity} (fraction of the all-8-bit model's)")
        ax.set_ylabel("ΣΩ (Hessian-weighted quantization error)")
        ax.set_title("HAWQ: sensitivity against cost")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return Path(path)
