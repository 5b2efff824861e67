"""The report's figures (matplotlib, PNG): training curves (DPKD Fig. 4), reward vs reverse KL coloured by epoch
(Fig. 3), Rouge-L by reference-length bucket (Fig. 5), and the training log's own curves."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVES = {"reward_teacher": "implicit reward of teacher samples r(y_t)", "seq_fkl": "forward KL per token (y_t)",
          "seq_rkl": "reverse KL per token (y_s)", "first_token_rkl": "reverse KL, first token"}


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _save(fig, png: Path) -> Path:
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def diagnostics_curves(logs: dict[str, list[dict]], png: Path) -> Path | None:
    """Fig. 4: held-out diagnostics over training steps, one line per method (first seed)."""
    logs = {k: v for k, v in logs.items() if v}
    if not logs:
        return None
    fig, axes = plt.subplots(1, len(CURVES), figsize=(3.6 * len(CURVES), 3.0), squeeze=False)
    for ax, (key, title) in zip(axes[0], CURVES.items(), strict=True):
        for name, rows in logs.items():
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=name, marker=".", markersize=3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    return _save(fig, png)


def reward_vs_rkl(logs: dict[str, list[dict]], png: Path) -> Path | None:
    """Fig. 3: implicit reward of teacher samples against sequence reverse KL, coloured by epoch, per method."""
    logs = {k: v for k, v in logs.items() if v}
    if not logs:
        return None
    fig, axes = plt.subplots(1, len(logs), figsize=(3.4 * len(logs), 3.0), squeeze=False)
    for ax, (name, rows) in zip(axes[0], logs.items(), strict=True):
        pts = ax.scatter([r["seq_rkl"] for r in rows], [r["reward_teacher"] for r in rows],
                         c=[r["epoch"] for r in rows], cmap="viridis", s=18)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("reverse KL per token (student samples)", fontsize=8)
        ax.set_ylabel("implicit reward r(y_t)", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.colorbar(pts, ax=ax).set_label("epoch", fontsize=8)
    return _save(fig, png)


def rouge_by_bucket(results: dict, png: Path) -> Path | None:
    """Fig. 5: Rouge-L per reference-length bucket, one bar per model, with 95% intervals."""
    rows = results["rows"]
    buckets = sorted((g for g in rows[0]["breakdown"] if g.startswith("bucket:")), key=_bucket_start)
    if not buckets:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(buckets) * len(rows) / 3), 3.2))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        stats = [row["breakdown"][b]["rougeL"] for b in buckets]
        xs = [j + i * width for j in range(len(buckets))]
        means = [s["mean"] for s in stats]
        err = [[m - s["ci95"][0] for m, s in zip(means, stats, strict=True)],
               [s["ci95"][1] - m for m, s in zip(means, stats, strict=True)]]
        ax.bar(xs, means, width, yerr=err, capsize=2, label=row["name"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(buckets))])
    ax.set_xticklabels([f"{b[7:]} words (n={rows[0]['breakdown'][b]['n']})" for b in buckets], fontsize=8)
    ax.set_ylabel("Rouge-L", fontsize=8)
    ax.set_xlabel("reference length", fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, png)


def training_log(rows: list[dict], keys: list[str], png: Path) -> Path | None:
    """The training log's own curves (window means) for the keys it has."""
    keys = [k for k in keys if rows and k in rows[0]]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
        ax.plot([r["step"] for r in rows], [r[k] for r in rows])
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.tick_params(labelsize=7)
    return _save(fig, png)


def _bucket_start(group: str) -> float:
    return float(group.split("(")[1].split(",")[0])
