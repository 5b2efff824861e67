"""Generation evaluation with the DPKD / MiniLLM protocol: sampled responses, Rouge-L and exact match.

The metrics reproduce MiniLLM's `rouge_metric.py` (microsoft/LMOps), which DPKD reuses: Rouge-L is the F-measure
of `rouge_score.RougeScorer(["rougeL"], use_stemmer=True)` with its default tokenizer, max over references, x100;
exact match is SQuAD v1.1 normalisation without removing articles, max over references, x100. The default
tokenizer lowercases, turns every character outside [a-z0-9] into a space and stems words longer than three
characters: non-ASCII letters are dropped ("café" -> "caf", "naïve" -> "na ve"), and a text with no ASCII letter or
digit (e.g. Chinese) has no tokens and scores 0 even against itself. That is the protocol; `unscorable` counts the
references it cannot score so a report can say so.

Scores are matrices [seeds, prompts]; breakdowns (overall, by kind, by category, by reference-length bucket) give
the mean, std and 95% intervals over seeds, and per-prompt scores averaged over seeds feed paired bootstraps.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from rouge_score import rouge_scorer, tokenizers

from prefkd.config import opt
from prefkd.data.records import Instruction
from prefkd.generation import SamplingConfig
from prefkd.stats import bootstrap, mean_score, t_interval

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)  # exactly MiniLLM's default_rouge_scorer
_TOKENIZER = tokenizers.DefaultTokenizer(use_stemmer=True)  # the one RougeScorer builds for itself
BUCKETS = ((0, 30), (30, 70), (70, None))
PROTOCOL = {
    "rougeL": "rouge_score RougeScorer(['rougeL'], use_stemmer=True), default tokenizer (lowercase, tokens "
              "[a-z0-9]+ only: non-ASCII characters are dropped), F-measure, max over references, x100 "
              "(MiniLLM/DPKD rouge_metric.py)",
    "exact_match": "SQuAD v1.1 normalisation without removing articles (lowercase, drop string.punctuation, "
                   "collapse whitespace), max over references, x100",
    "length_bucket": "words (whitespace-separated) of the first reference: (0,30], (30,70], (70,inf)",
    "ci95": "Student-t interval of the mean over sampling seeds (prefkd.stats.t_interval)",
    "ci95_bootstrap": "percentile interval over 2000 replicates resampling prompts and seeds (prefkd.stats.bootstrap)",
}


@dataclass
class EvalConfig:
    seeds: list[int] = opt([10, 20, 30, 40, 50], "sampling seeds; the report gives mean and spread over them")
    # MiniLLM's evaluate.py (which DPKD's numbers come from) samples with top_k 0, top_p 1, temperature 1 and its
    # argparse default no_repeat_ngram_size 6, which eval_main_dolly.sh does not override.
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(no_repeat_ngram_size=6),
                                     metadata={"help": "generation settings of the evaluation (MiniLLM's: "
                                                       "no_repeat_ngram_size 6)"})


def _check_references(references: Sequence[str]) -> None:
    if isinstance(references, str) or not references:
        raise ValueError(f"references must be a non-empty list of strings, got {references!r}")


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Rouge-L F-measure x100, max over references (the MiniLLM/DPKD protocol; see the module docstring)."""
    _check_references(references)
    return 100 * max(_SCORER.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation without removing articles: lowercase, strip punctuation, collapse whitespace."""
    punctuation = set(string.punctuation)
    return " ".join("".join(ch for ch in text.lower() if ch not in punctuation).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """100 if the normalised prediction equals any normalised reference, else 0."""
    _check_references(references)
    return 100.0 * max(normalize_answer(prediction) == normalize_answer(ref) for ref in references)


def rouge_tokens(text: str) -> list[str]:
    """The tokens Rouge-L compares (rouge_score's default tokenizer with the Porter stemmer)."""
    return _TOKENIZER.tokenize(text)


def unscorable(records: Sequence[Instruction]) -> int:
    """Records none of whose references has a token the protocol's tokenizer keeps: Rouge-L is 0 whatever the model
    says (e.g. a reference written entirely in Chinese)."""
    return sum(not any(rouge_tokens(ref) for ref in r.references) for r in records)


def length_bucket(reference: str) -> str:
    n = len(re.findall(r"\S+", reference))
    for lo, hi in BUCKETS:
        if n > lo and (hi is None or n <= hi):
            return f"({lo},{hi if hi is not None else 'inf'}]"
    return f"(0,{BUCKETS[0][1]}]"  # empty reference


def groups(records: Sequence[Instruction]) -> dict[str, list[int]]:
    """Prompt indices of each breakdown, in this order: "all", "kind:K" and "category:C" (when records have them,
    sorted), "bucket:(lo,hi]" (shortest first)."""
    by: dict[str, dict[str, list[int]]] = {"kind": {}, "category": {}, "bucket": {}}
    for i, r in enumerate(records):
        if r.kind:
            by["kind"].setdefault(r.kind, []).append(i)
        if r.category:
            by["category"].setdefault(r.category, []).append(i)
        by["bucket"].setdefault(length_bucket(r.references[0] if r.references else ""), []).append(i)
    order = [f"({lo},{hi if hi is not None else 'inf'}]" for lo, hi in BUCKETS]
    out: dict[str, list[int]] = {"all": list(range(len(records)))}
    for key in ("kind", "category"):
        out.update({f"{key}:{v}": by[key][v] for v in sorted(by[key])})
    out.update({f"bucket:{b}": by["bucket"][b] for b in order if b in by["bucket"]})
    return out


def prompt_scores(records: Sequence[Instruction], predictions_per_seed: dict[int, list[str]]) -> dict[str, np.ndarray]:
    """{metric: [seeds, prompts] array} of Rouge-L and exact match, seeds in the order of the dict."""
    for seed, preds in predictions_per_seed.items():
        if len(preds) != len(records):
            raise ValueError(f"seed {seed}: {len(preds)} predictions for {len(records)} records")
    return {
        "rougeL": np.array([[rouge_l(p, r.references) for p, r in zip(preds, records, strict=True)]
                            for preds in predictions_per_seed.values()], dtype=np.float64),
        "exact_match": np.array([[exact_match(p, r.references) for p, r in zip(preds, records, strict=True)]
                                 for preds in predictions_per_seed.values()], dtype=np.float64),
    }


def summarize(matrix: np.ndarray, n_boot: int = 2000) -> dict:
    """Mean over prompts per seed, then mean, std, t interval over seeds and a prompts x seeds bootstrap interval."""
    per_seed = [float(x) for x in matrix.mean(axis=1)]
    ci = t_interval(per_seed)
    boot = bootstrap(mean_score("m"), {"m": matrix}, n_boot=n_boot, seed=0)
    return {"mean": float(np.mean(per_seed)), "std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
            "per_seed": per_seed, "ci95": [ci.low, ci.high], "ci95_bootstrap": [boot.low, boot.high]}


def breakdown(records: Sequence[Instruction], scores: dict[str, np.ndarray]) -> dict:
    """{group: {"n": prompts, metric: summarize(...)}} for every group of `groups(records)`."""
    return {g: {"n": len(idx), **{m: summarize(s[:, idx]) for m, s in scores.items()}}
            for g, idx in groups(records).items()}


def score(records: list[Instruction], predictions_per_seed: dict[int, list[str]],
          per_prompt: dict[str, np.ndarray] | None = None) -> dict:
    """Rouge-L and exact match overall, by kind, by category and by length bucket, over seeds (from `per_prompt`
    when the scores are already computed)."""
    scores = per_prompt if per_prompt is not None else prompt_scores(records, predictions_per_seed)
    return breakdown(records, {m: np.asarray(v, dtype=np.float64) for m, v in scores.items()})


def scores_text(scores: dict) -> str:
    """Every group of a scores dict as plain fixed-width text (logs keep it whole): n, each metric's mean ± std over
    seeds, and Rouge-L's 95% t interval over seeds."""
    labels = {"rougeL": "Rouge-L", "exact_match": "EM", "win_rate": "win %", "judge_score": "judge"}
    metrics = [m for m in labels if m in scores["all"]]
    width = max(len(g) for g in scores)
    lines = [f"{'group':{width}} {'n':>5} " + " ".join(f"{labels[m]:>14}" for m in metrics) + "  Rouge-L 95% CI"]
    for group, s in scores.items():
        low, high = s["rougeL"]["ci95"]
        lines.append(f"{group:{width}} {s['n']:5d} "
                     + " ".join(f"{s[m]['mean']:7.2f} ±{s[m]['std']:5.2f}" for m in metrics)
                     + f"  {low:.2f} to {high:.2f}")
    return "\n".join(["mean ± std over sampling seeds", *lines])
