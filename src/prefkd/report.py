"""Tables, verdicts and the report of an experiment (`results.json` + the runs' logs) as markdown and HTML.

`write_report(run_dir, results)` is what `prefkd compare`, `prefkd demo` and `prefkd report RUN_DIR` call; it
reads everything else (diagnostics, training logs) from the run directory, so a report can be rebuilt any time.
"""

from __future__ import annotations

import base64
import math
import re
from pathlib import Path

import markdown
from rich.table import Table

from prefkd import atomic, plots

KIND_LABELS = {"kind:D": "D items", "kind:D0": "D0 items", "kind:skill": "skill items"}
TRAINING_CURVES = ["loss", "pref_loss", "reward_chosen", "reward_rejected", "teacher_logp_student", "seq_rkl",
                   "divergence", "plad_loss", "distillm2_loss", "nll"]


def _ci(stat: dict) -> str:
    return f"{stat['mean']:.2f} [{stat['ci95'][0]:.2f}, {stat['ci95'][1]:.2f}]"


def _signed(d: dict) -> str:
    mark = " *" if d["significant"] else ""
    return f"{d['diff']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]{mark}"


def _gap(stat: dict) -> str:
    g = stat.get("gap_recovered")
    if not g or not math.isfinite(g["value"]):
        return ""
    return f"{g['value']:+.0%} [{g['ci95'][0]:+.0%}, {g['ci95'][1]:+.0%}]"


def _kinds(results: dict) -> list[str]:
    return [g for g in KIND_LABELS if g in results["rows"][0]["breakdown"]]


def _buckets(results: dict) -> list[str]:
    b = results["rows"][0]["breakdown"]
    return sorted((g for g in b if g.startswith("bucket:")), key=lambda g: float(g.split("(")[1].split(",")[0]))


def results_table(results: dict) -> Table:
    """The console table: Rouge-L with 95% intervals, difference from sft, gap recovered, by kind."""
    kinds = _kinds(results)
    table = Table(title=f"{results['split']} split ({results['n_prompts']} prompts), eval seeds {results['seeds']}, "
                        f"training seeds {results['train_seeds']}: mean [95% CI]; * = interval excludes 0")
    ts = any("ts_win_rate" in r for r in results["rows"])
    for col in ["model", "Rouge-L", "vs sft", "gap recovered", "EM", *(["T-S WR"] if ts else []),
                *(KIND_LABELS[g] for g in kinds)]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in results["rows"]:
        vs = r["rougeL"].get("vs", {}).get("sft")
        table.add_row(r["name"], _ci(r["rougeL"]), _signed(vs) if vs else "", _gap(r["rougeL"]),
                      f"{r['exact_match']['mean']:.2f}",
                      *([f"{r['ts_win_rate']['mean']:.1f}" if "ts_win_rate" in r else ""] if ts else []),
                      *(_ci(r["breakdown"][g]["rougeL"]) for g in kinds))
    return table


def main_table(results: dict) -> str:
    """Table 1 of the DPKD paper, with intervals: one row per model, Rouge-L and EM per evaluation subset."""
    kinds = _kinds(results)
    judged = "win_rate" in results["rows"][0]
    ts = any("ts_win_rate" in r for r in results["rows"])
    head = ["model", "runs", "Rouge-L", "vs sft", "vs sft_continued", "gap recovered", "EM",
            *(["win rate vs refs"] if judged else []), *(["T-S WR"] if ts else []),
            *(f"{KIND_LABELS[g]} (n={results['rows'][0]['breakdown'][g]['n']})" for g in kinds)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        vs = r["rougeL"].get("vs", {})
        cells = [r["name"], str(r["runs"]), _ci(r["rougeL"]),
                 _signed(vs["sft"]) if "sft" in vs else "", _signed(vs["sft_continued"]) if "sft_continued" in vs
                 else "", _gap(r["rougeL"]), _ci(r["exact_match"]), *([_ci(r["win_rate"])] if judged else []),
                 *([_ci(r["ts_win_rate"]) if "ts_win_rate" in r else ""] if ts else [])]
        cells += [_ci(r["breakdown"][g]["rougeL"]) for g in kinds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bucket_table(results: dict, metric: str) -> str:
    """Tables 4 and 5 of the DPKD paper: a metric per reference-length bucket."""
    buckets = _buckets(results)
    b0 = results["rows"][0]["breakdown"]
    head = ["model", *(f"{g[7:]} words (n={b0[g]['n']})" for g in buckets)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        lines.append("| " + " | ".join([r["name"], *(_ci(r["breakdown"][g][metric]) for g in buckets)]) + " |")
    return "\n".join(lines)


def diagnostics_table(results: dict, logs: dict[str, list[dict]]) -> str:
    """Table 3 of the DPKD paper: Rouge-L with the best held-out diagnostics reached during training."""
    by = {r["name"]: r for r in results["rows"]}
    head = ["run", "Rouge-L", "min rKL first token", "min fKL first token", "min rKL per token (y_s)",
            "max reward r(y_t)", "final reward r(y_t)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in logs.items():
        if not rows:
            continue
        base = name.split("/")[0]
        lines.append("| " + " | ".join([
            name, f"{by[base]['rougeL']['mean']:.2f}" if base in by else "",
            f"{min(r['first_token_rkl'] for r in rows):.4f}", f"{min(r['first_token_fkl'] for r in rows):.4f}",
            f"{min(r['seq_rkl'] for r in rows):.4f}", f"{max(r['reward_teacher'] for r in rows):.4f}",
            f"{rows[-1]['reward_teacher']:.4f}"]) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def verdict(results: dict, name: str, baseline: str = "sft", group: str = "all") -> str:
    """Plain words on whether `name` beat `baseline` on a prompt group, from the paired bootstrap interval."""
    by = {r["name"]: r for r in results["rows"]}
    if name not in by or group not in by[name]["breakdown"]:
        return ""
    stat = by[name]["breakdown"][group]["rougeL"]
    vs = stat.get("vs", {}).get(baseline)
    if not vs:
        return ""
    word = ("beat" if vs["diff"] > 0 else "lost to") if vs["significant"] else "did not differ significantly from"
    where = {"all": "overall", "kind:D": "on D items (facts only the teacher knows)"}.get(group, f"on {group}")
    line = (f"{name} {word} {baseline} {where}: {stat['mean']:.2f} vs "
            f"{by[baseline]['breakdown'][group]['rougeL']['mean']:.2f} Rouge-L, difference {_signed(vs)}")
    if baseline == "sft" and _gap(stat):
        line += f"; {_gap(stat)} of the teacher-SFT gap"
    return line + "."


def first_seed(results: dict) -> int:
    """The training seed whose run of each method the curves and the diagnostics table show."""
    return (results.get("train_seeds") or [0])[0]


def first_run(run_dir: Path, name: str, results: dict, log: str) -> Path | None:
    """`log` of the run of `name` with the comparison's first training seed, or None. Not the lowest seed on disk:
    an output directory that several comparisons share holds other comparisons' seeds too."""
    path = run_dir / name / f"seed{first_seed(results)}" / log
    return path if path.is_file() else None


def diagnostics_logs(run_dir: Path, names: list[str], results: dict) -> dict[str, list[dict]]:
    """name -> the diagnostics rows of its run with the first training seed."""
    return {name: plots.read_jsonl(path) for name in names
            if (path := first_run(run_dir, name, results, "diagnostics.jsonl"))}


def write_report(run_dir: str | Path, results: dict) -> Path:
    """report.md and a self-contained report.html (plots embedded) under `run_dir`."""
    out = Path(run_dir)
    suffix = f"-{results['tag']}" if results.get("tag") else ""
    figures = out / f"plots{suffix}"
    methods = [r["name"] for r in results["rows"] if r["name"] not in ("teacher", "sft", "sft_continued")]
    logs = diagnostics_logs(out, methods, results)
    seed = first_seed(results)
    parts = [f"# prefkd report: {out.name}{' / ' + results['tag'] if suffix else ''}\n",
             f"Evaluation on the **{results['split']}** split ({results['n_prompts']} prompts), sampled generation "
             f"with eval seeds {results['seeds']}; distillation runs with training seeds {results['train_seeds']}. "
             f"Wall time {results.get('wall_seconds', 0):.0f} s (stages reused from earlier runs are not timed "
             "again).\n",
             "Intervals are 95% percentile intervals of a bootstrap that resamples test prompts (shared by all "
             "models, so differences are paired) and, per model, its training runs "
             f"({results['bootstrap']} replicates, `prefkd.stats`). `*` marks a difference whose interval excludes 0. "
             "Gap recovered = (model - sft) / (teacher - sft)."
             + (f" Win rate vs refs: judge `{results['judge']}` prefers the response to the best reference (ties "
                "half), x100." if results.get("judge") else "")
             + (f" T-S WR: PLaD's teacher-over-student win rate, x100, judge `{results['ts_judge']}`: each response "
                "of the row against the teacher's of the same eval seed and prompt, ties (equal scores or the same "
                "text) half; 50 = as good as the teacher." if results.get("ts_judge") else "") + "\n",
             "## Main results (Rouge-L and exact match x100)\n", main_table(results), ""]
    verdicts = [v for m in methods for base in ("sft", "sft_continued") for g in ("all", "kind:D")
                if (v := verdict(results, m, base, g))]
    if verdicts:
        parts += ["## Verdicts\n", *[f"- {v}" for v in verdicts], ""]
    for base in results.get("contrasts", []):
        if lines := [v for m in methods if m != base and (v := verdict(results, m, base))]:
            parts += [f"## Against {base} (paired on prompts)\n", *[f"- {v}" for v in lines], ""]
    if _buckets(results):
        parts += ["## By reference length (Rouge-L)\n", bucket_table(results, "rougeL"), "",
                  "## By reference length (exact match)\n", bucket_table(results, "exact_match"), ""]
        if png := plots.rouge_by_bucket(results, figures / "rouge_by_length.png"):
            parts += [f"![Rouge-L by length]({png.relative_to(out)})\n"]
    if table := diagnostics_table(results, logs):
        parts += ["## Held-out diagnostics during training\n",
                  f"On a fixed batch of validation prompts (training seed {seed}): the implicit reward "
                  "r(y_t) = beta/|y| log q(y_t)/p(y_t) of teacher samples (DPKD's reward: higher is closer to the "
                  "teacher), the reverse KL per token on the student's own samples, and the exact KLs of the first "
                  "response token (the paper's Table 3). The student-sample reward r(y_s) is beta times the rKL "
                  "estimate, so it is not repeated.\n", table, ""]
        if png := plots.diagnostics_curves(logs, figures / "diagnostics_curves.png"):
            parts += [f"![diagnostics over training]({png.relative_to(out)})\n"]
        if png := plots.reward_vs_rkl(logs, figures / "reward_vs_rkl.png"):
            parts += [f"![reward vs reverse KL]({png.relative_to(out)})\n",
                      "Fig. 3 of the DPKD paper: each point is one diagnostics step, coloured by epoch; the paper "
                      "expects training to move up (reward) and left (reverse KL).\n"]
    for name in methods:
        log = first_run(out, name, results, "train_log.jsonl")
        if log and (png := plots.training_log(plots.read_jsonl(log), TRAINING_CURVES,
                                              figures / f"{name}_training.png")):
            parts += [f"## {name}: training log (seed {seed})\n", f"![{name}]({png.relative_to(out)})\n"]
    parts += ["On fresh on-policy samples the DPKD margin r(y_t) - r(y_s) is negative in expectation, so preference "
              "accuracy below 0.5 is not failure; watch the teacher's log-prob of the student's samples and the "
              "held-out reward and KLs instead.\n"]
    text = "\n".join(parts) + "\n"
    atomic.write_text(out / f"report{suffix}.md", text)
    atomic.write_text(out / f"report{suffix}.html", to_html(text, out))
    return out / f"report{suffix}.md"


def to_html(text: str, base: Path) -> str:
    """Markdown to one self-contained HTML page: tables rendered, images inlined as base64."""

    def inline(match: re.Match) -> str:
        path = base / match.group(2)
        if not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode()
        return f"![{match.group(1)}](data:image/png;base64,{data})"

    body = markdown.markdown(re.sub(r"!\[([^\]]*)\]\(([^)]+\.png)\)", inline, text), extensions=["tables"])
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;line-height:1.45}"
             "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>prefkd report</title><style>{style}</style>" \
           f"</head><body>{body}</body></html>\n"
