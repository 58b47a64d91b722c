"""`duet eval report --plot DIR`: the verifier's calibration and the accuracy per mode and kind, as PNGs.

matplotlib is an optional extra (`pip install 'duet[plot]'`); without it the command says how to get it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from duet.app.errors import UsageProblem
from duet.evaluation.stats import calibration_bins


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageProblem("--plot needs matplotlib: pip install 'duet[plot]' (or pip install matplotlib)") from None
    return plt


def write_plots(systems: dict[str, list[dict[str, Any]]], out_dir: Path) -> list[Path]:
    """PNG files in ``out_dir``: ``calibration.png`` (one line per system whose records carry the verifier's
    score of the solver's first answer) and ``accuracy.png`` (accuracy per system, per kind when the data
    has kinds). Returns the paths written."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    scored = {name: [(r["first_score"], bool(r.get("first_correct"))) for r in records
                     if isinstance(r.get("first_score"), (int, float)) and "first_correct" in r]
              for name, records in systems.items()}
    scored = {name: pairs for name, pairs in scored.items() if pairs}
    if scored:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
        for name, pairs in scored.items():
            bins = calibration_bins([s for s, _ in pairs], [y for _, y in pairs])
            ax.plot([b["mean_score"] for b in bins], [b["accuracy"] for b in bins], marker="o",
                    label=f"{name} (n={len(pairs)})")
        ax.set_xlabel("verifier score of the solver's first answer, P(correct)")
        ax.set_ylabel("fraction right")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title("Verifier calibration (reliability diagram)")
        written.append(_save(plt, fig, ax, out_dir / "calibration.png"))
    kinds = sorted({str(r["kind"]) for records in systems.values() for r in records if r.get("kind")})
    groups = kinds or ["all"]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups) * max(1, len(systems)) / 2), 4.5))
    width = 0.8 / max(1, len(systems))
    for i, (name, records) in enumerate(systems.items()):
        values = []
        for group in groups:
            members = [r for r in records if group == "all" or r.get("kind") == group]
            values.append(100 * sum(1 for r in members if r.get("correct")) / len(members) if members else 0)
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=name)
    ax.set_xticks([g + width * (len(systems) - 1) / 2 for g in range(len(groups))], groups, rotation=20)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy per mode" + (" and kind" if kinds else ""))
    written.append(_save(plt, fig, ax, out_dir / "accuracy.png"))
    return written


def _save(plt: Any, fig: Any, ax: Any, path: Path) -> Path:
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
