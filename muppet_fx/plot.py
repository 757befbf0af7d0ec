"""``plot_policy``: the policy's ratio ``p`` against its decaying threshold, with the precision
levels as coloured bands (the MuPPET paper's Figure 2)."""
from __future__ import annotations

from pathlib import Path

__all__ = ["plot_policy"]


def plot_policy(history: list[dict], path) -> Path:
    """Draw ``history`` (``PrecisionManager.history``) to a PNG at ``path``; returns the path.

    Needs matplotlib (``pip install 'muppet_fx[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plot_policy needs matplotlib: pip install 'muppet_fx[plot]'") from err
    if not history:
        raise ValueError("history is empty: nothing to plot")
    fig, ax = plt.subplots(figsize=(8, 4))
    levels = [r.get("level") for r in history]
    colours = plt.get_cmap("tab10")
    order = list(dict.fromkeys(levels))
    start = 0
    for i in range(1, len(history) + 1):
        if i == len(history) or levels[i] != levels[start]:
            lvl = levels[start]
            ax.axvspan(history[start]["epoch"] - 0.5, history[i - 1]["epoch"] + 0.5, alpha=0.15,
                       color=colours(order.index(lvl) % 10), label=f"{lvl}" + (" bits" if lvl != "fp32" else ""))
            start = i
    pts = [(r["epoch"], r["p"]) for r in history if r.get("p") is not None]
    thr = [(r["epoch"], r["threshold"]) for r in history if r.get("threshold") is not None]
    if thr:
        ax.plot(*zip(*thr), "k--", label="threshold T")
    if pts:
        ax.plot(*zip(*pts), "o-", color="tab:red", label="p = max(S) / diversity")
    for r in history:
        if r.get("switched"):
            ax.axvline(r["epoch"] + 0.5, color="grey", lw=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("ratio")
    ax.set_title("MuPPET precision policy")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
