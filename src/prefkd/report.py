"""Tables and plots: the demo's results table, report.md and training curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from prefkd import atomic

KIND_LABELS = {"kind:D": "D items", "kind:D0": "D0 items", "kind:skill": "skill items"}


def _pm(stat: dict) -> str:
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def results_table(results: dict) -> Table:
    rows = results["rows"]
    groups = [g for g in KIND_LABELS if g in rows[0]["breakdown"]]
    table = Table(title=f"Test split, sampled (seeds {results['seeds']}): mean ± std over seeds")
    for col in ["model", "Rouge-L", "exact match", *(f"Rouge-L {KIND_LABELS[g]}" for g in groups)]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(r["name"], _pm(r["rougeL"]), _pm(r["exact_match"]),
                      *(_pm(r["breakdown"][g]["rougeL"]) for g in groups))
    return table


def markdown_table(results: dict) -> str:
    rows = results["rows"]
    b = rows[0]["breakdown"]
    groups = [g for g in KIND_LABELS if g in b]
    buckets = sorted((g for g in b if g.startswith("bucket:")), key=lambda g: float(g.split("(")[1].split(",")[0]))
    head = (["model", "Rouge-L", "EM"] + [f"{KIND_LABELS[g]} (n={b[g]['n']})" for g in groups]
            + [f"len {g[7:]} (n={b[g]['n']})" for g in buckets])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], _pm(r["rougeL"]), _pm(r["exact_match"])]
        cells += [_pm(r["breakdown"][g]["rougeL"]) for g in groups + buckets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(results: dict, method: str, baseline: str = "sft") -> str:
    """Plain words on whether `method` beat `baseline`, overall and on D items.

    "beat" / "lost to" = the difference of means exceeds the larger of the two seed standard deviations; a crude
    rule with few seeds, stated as such in the output.
    """
    by = {r["name"]: r for r in results["rows"]}
    if method not in by or baseline not in by:
        return ""
    out = []
    for group, label in (("all", "overall"), ("kind:D", "on D items (facts only the teacher knows)")):
        if group not in by[method]["breakdown"]:
            continue
        m, s = by[method]["breakdown"][group]["rougeL"], by[baseline]["breakdown"][group]["rougeL"]
        diff = m["mean"] - s["mean"]
        noise = max(m["std"], s["std"])
        word = "beat" if diff > noise else ("lost to" if diff < -noise else "tied with")
        line = f"{method} {word} {baseline} {label}: {m['mean']:.2f} vs {s['mean']:.2f} ({diff:+.2f} Rouge-L"
        if baseline == "sft" and "teacher" in by:
            t = by["teacher"]["breakdown"][group]["rougeL"]["mean"]
            if t != s["mean"]:
                line += f"; {diff / (t - s['mean']):+.0%} of the teacher-SFT gap"
        out.append(line + f"; larger seed std {noise:.2f}).")
    return "\n".join(out)


def plot_training(log_path: Path, png: Path, keys: list[str]) -> bool:
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    keys = [k for k in keys if rows and k in rows[0]]
    if not keys:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
        ax.plot([r["step"] for r in rows], [r[k] for r in rows])
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


DPKD_CURVES = ["loss", "reward_chosen", "reward_rejected", "pref_accuracy", "teacher_logp_student", "seq_rkl"]


def write_report(out: Path, results: dict, cfg: Any) -> None:
    parts = [f"# prefkd demo report\n\nWall time: {results['wall_seconds']:.0f} s "
             f"(stages reused from earlier runs are not timed again).\n",
             "## Test results (Rouge-L and exact match x100)\n", markdown_table(results), ""]
    for name in cfg.methods:
        v = "\n".join(verdict(results, name, base) for base in ("sft", "sft_continued"))
        if v.strip():
            parts += [f"## Did {name} beat SFT?\n", v, ""]
        log = out / name / "train_log.jsonl"
        if log.is_file() and plot_training(log, out / "plots" / f"{name}_training.png", DPKD_CURVES):
            parts += [f"## {name} training curves\n", f"![{name}](plots/{name}_training.png)\n",
                      "On fresh on-policy samples the DPKD margin is negative in expectation, so preference accuracy "
                      "below 0.5 is not failure; watch the teacher's log-prob of the student's samples "
                      "(`teacher_logp_student`) and the sequence reverse KL (`seq_rkl`) instead.\n"]
    atomic.write_text(out / "report.md", "\n".join(parts) + "\n")
