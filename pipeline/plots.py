"""Small matplotlib helpers (Agg backend, atomic PNG writes)."""

from __future__ import annotations

from pathlib import Path

from pipeline.io import atomic_path


def learning_curves(runs: dict[str, list[dict]], dense_top1: float | None, path: Path, title: str) -> None:
    """Top-1 against mask-training steps, one line per run (e.g. per initialisation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, history in runs.items():
        ax.plot([p["step"] for p in history], [p["top1"] for p in history], marker="o", ms=3, label=label)
    if dense_top1 is not None:
        ax.axhline(dense_top1, color="black", ls="--", lw=1, label=f"dense {dense_top1:.2f}%")
        ax.axhline(dense_top1 - 0.5, color="grey", ls=":", lw=1, label="dense - 0.5 pt")
    ax.set_xlabel("mask-training steps")
    ax.set_ylabel("top-1 (%), argmax masks")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
