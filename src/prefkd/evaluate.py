"""Generation evaluation with the DPKD / MiniLLM protocol: sampled responses, Rouge-L and exact match.

Metrics are pure functions on strings, 0-100, max over references. Breakdowns by record kind (the embedded
suite's D / D0 / skill items) and by reference-length bucket (0,30], (30,70], (70,inf) words.
"""

from __future__ import annotations

import re
import statistics
import string
from dataclasses import dataclass

from rouge_score import rouge_scorer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefkd.config import opt, section
from prefkd.console import progress
from prefkd.data.collate import encode_prompts
from prefkd.data.records import Instruction
from prefkd.generation import SamplingConfig, sample_responses

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
BUCKETS = ((0, 30), (30, 70), (70, None))


@dataclass
class EvalConfig:
    seeds: list[int] = opt([10, 20, 30, 40, 50], "sampling seeds; the report gives mean and spread over them")
    sampling: SamplingConfig = section(SamplingConfig, "generation settings of the evaluation")


def rouge_l(prediction: str, references: list[str] | tuple[str, ...]) -> float:
    """Rouge-L F-measure (rouge_score, Porter stemmer) x100, max over references."""
    return 100 * max(_SCORER.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def _normalize(text: str) -> str:
    """SQuAD normalisation without removing articles: lowercase, strip punctuation, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(text.split())


def exact_match(prediction: str, references: list[str] | tuple[str, ...]) -> float:
    return 100.0 * max(_normalize(prediction) == _normalize(ref) for ref in references)


def length_bucket(reference: str) -> str:
    n = len(re.findall(r"\S+", reference))
    for lo, hi in BUCKETS:
        if n > lo and (hi is None or n <= hi):
            return f"({lo},{hi if hi is not None else 'inf'}]"
    return f"(0,{BUCKETS[0][1]}]"  # empty reference


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: list[Instruction],
             sampling: SamplingConfig, seed: int, name: str = "generate") -> list[str]:
    prompts = encode_prompts(tokenizer, [r.prompt for r in records])
    with progress() as bar:
        task = bar.add_task(name, total=len(prompts), info=f"seed {seed}")
        ids = sample_responses(model, prompts, sampling, tokenizer.pad_token_id, tokenizer.eos_token_id, seed,
                               on_batch=lambda n: bar.update(task, advance=n))
    return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]


def _mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "per_seed": xs}


def prompt_scores(records: list[Instruction],
                  predictions_per_seed: dict[int, list[str]]) -> dict[str, list[list[float]]]:
    """{"rougeL": [seed][prompt], "exact_match": [seed][prompt]}: every prediction's score, for any breakdown or
    paired comparison later."""
    return {"rougeL": [[rouge_l(p, r.references) for p, r in zip(preds, records, strict=True)]
                       for preds in predictions_per_seed.values()],
            "exact_match": [[exact_match(p, r.references) for p, r in zip(preds, records, strict=True)]
                            for preds in predictions_per_seed.values()]}


def groups(records: list[Instruction]) -> dict[str, list[int]]:
    """Prompt indices of "all", each record kind ("kind:D", ...) and each reference-length bucket."""
    out: dict[str, list[int]] = {"all": list(range(len(records)))}
    for i, r in enumerate(records):
        if r.kind:
            out.setdefault(f"kind:{r.kind}", []).append(i)
        out.setdefault(f"bucket:{length_bucket(r.references[0])}", []).append(i)
    return out


def score(records: list[Instruction], predictions_per_seed: dict[int, list[str]],
          per_prompt: dict[str, list[list[float]]] | None = None) -> dict:
    """Rouge-L and exact match overall, by kind and by length bucket: mean and std over seeds."""
    per_prompt = per_prompt or prompt_scores(records, predictions_per_seed)
    out: dict = {}
    for group, idx in groups(records).items():
        out[group] = {"n": len(idx), **{metric: _mean_std([statistics.fmean(row[i] for i in idx) for row in rows])
                                        for metric, rows in per_prompt.items()}}
    return out


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: list[Instruction],
             cfg: EvalConfig, name: str = "eval") -> tuple[dict, dict[int, list[str]], dict[str, list[list[float]]]]:
    """(scores, predictions per seed, per-prompt scores) of `model` on `records` with sampled generation."""
    preds = {seed: generate(model, tokenizer, records, cfg.sampling, seed, f"{name} seed {seed}")
             for seed in cfg.seeds}
    per_prompt = prompt_scores(records, preds)
    return score(records, preds, per_prompt), preds, per_prompt
