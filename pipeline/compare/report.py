"""compare.md and compare.png from the compare summary."""

from __future__ import annotations

from pathlib import Path


def markdown(summary: dict) -> str:
    lines = [
        f"# Mask methods on {summary['model']}",
        "",
        f"Weights: {summary['weights']}. Evaluation: {summary['data']}, {summary['samples']} images, "
        f"weights frozen. {summary['n']}:{summary['m']} masks on {summary['masked_layers']} layers "
        f"({100 * summary['masked_mac_fraction']:.1f}% of the MACs).",
        "",
    ]
    if not summary["accuracy_meaningful"]:
        lines += ["**Synthetic data: the accuracies below mean nothing.**", ""]
    lines += [
        "| method | changes weights | top-1 % | top-5 % | top-1 drop (pt) | seconds | kept \\|w\\| % "
        "| diversity (bits) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| dense | - | {summary['dense']['top1']:.2f} | {summary['dense']['top5']:.2f} | 0.00 | - | 100.0 | - |",
    ]
    for row in summary["methods"]:
        seconds = f"{row['seconds']:.1f}" + (" (reused)" if row.get("reused") else "")
        changes = "**yes**" if row["changes_weights"] else "no"
        lines.append(
            f"| {row['method']} | {changes} | {row['top1']:.2f} | {row['top5']:.2f} | {row['top1_drop']:.2f} | {seconds} "
            f"| {100 * row['kept_magnitude']:.1f} | {row['diversity_bits']:.0f} |"
        )
    lines += [
        "",
        f"Unstructured 50% sparsity on the same layers would admit "
        f"{summary['methods'][0]['unstructured_diversity_bits']:.0f} bits of masks.",
        "",
    ]
    if summary["best_heuristic"]:
        verdict = {True: "beats", False: "does not beat", None: "was not compared with"}[
            summary["learned_beats_best_heuristic"]
        ]
        lines.append(
            f"Best heuristic with frozen weights: {summary['best_heuristic']}; the learned mask {verdict} "
            "it on top-1. Methods that change weights are not part of this verdict."
        )
    for row in summary["methods"]:
        for key in ("layers_not_permuted", "layers_plain_nm"):
            for name, reason in (row.get(key) or {}).items():
                lines.append(f"- {row['method']}: {name}: {reason}")
    return "\n".join(lines) + "\n"


def chart(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io import atomic_path

    rows = summary["methods"]
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2.5, 4.0))
    names = [row["method"] for row in rows]
    bars = ax.bar(names, [row["top1"] for row in rows], color="tab:blue")
    ax.axhline(summary["dense"]["top1"], color="black", ls="--", lw=1, label=f"dense {summary['dense']['top1']:.2f}%")
    for bar, row in zip(bars, rows):
        ax.annotate(
            f"{row['top1']:.2f}%\n{row['seconds']:.1f}s",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    low = min([row["top1"] for row in rows] + [summary["dense"]["top1"]])
    ax.set_ylim(max(0.0, low - 10.0), 100.0 if summary["accuracy_meaningful"] else max(low + 20, 30))
    ax.set_ylabel("top-1 (%), frozen weights")
    title = f"{summary['model']}: {summary['n']}:{summary['m']} mask methods"
    ax.set_title(title + ("" if summary["accuracy_meaningful"] else " (synthetic data)"))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    plt.setp(ax.get_xticklabels(), rotation=15)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
