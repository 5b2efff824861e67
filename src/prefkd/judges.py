"""Judges and win rates (PLaD's evaluation): which of two responses to a prompt is better.

A `Judge` scores responses given their records (the prompt, and the references where there are some); higher is
better. Three judges:

- `RewardModelJudge`: any `AutoModelForSequenceClassification` with one output (e.g. PLaD's
  OpenAssistant/reward-model-deberta-v3-large-v2), by hub id or local path; the input is the text pair
  (question, response), the question being the instruction with its input after a blank line.
- `LogLikelihoodJudge`: the mean per-token log-probability of the response (EOS included) after the Alpaca prompt
  under a local causal LM, e.g. the teacher. Needs no hub and no reference, but measures plausibility to that LM,
  not quality: it favours short, generic or repetitive text and the judge's own samples, so a teacher judging
  teacher vs student is biased towards the teacher. Prefer a third, stronger LM.
- `RougeJudge`: Rouge-L against the references. Meaningful only to rank two models' responses on prompts with
  references (e.g. teacher vs student); it cannot judge a response against the references themselves.

Win rate of A over B = 100 x mean over prompts of 1 (A's score higher), 0.5 (tie: identical texts, or scores within
`tie_tolerance`), 0 (B's higher). Against references: B is the best-scoring reference of the prompt, so a model
wins a prompt only by beating every reference.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from prefkd.config import opt
from prefkd.data.chat import renderer_for
from prefkd.data.collate import Example, collate
from prefkd.data.records import Instruction
from prefkd.errors import ConfigError, PrefkdError
from prefkd.evaluate import rouge_l
from prefkd.logprobs import response_token_logps
from prefkd.models import load_model, load_tokenizer

KINDS = ("auto", "reward-model", "loglik", "rouge")


@dataclass
class JudgeConfig:
    path: str = opt("", "judge model: a sequence-classification reward model or a causal LM (hub id or path), or "
                        "'rouge'; empty = no judge")
    kind: str = opt("auto", f"{', '.join(KINDS)}; auto = from the model's config (a *ForSequenceClassification is a "
                            "reward model, anything else a log-likelihood judge)")
    batch_size: int = opt(16, "responses per judge forward pass")
    max_length: int = opt(1024, "longest judge input in tokens; a reward model cuts the longer of question and "
                                "response first, a log-likelihood judge cuts the prompt from the left")
    tie_tolerance: float = opt(0.0, "score differences up to this count as ties (half a win)")
    trust_remote_code: bool = opt(False, "allow a hub judge's own code to run")


class Judge(ABC):
    """Scores responses: higher is better. `name` identifies the judge in outputs."""

    name: str = "judge"
    needs_references: bool = False

    @abstractmethod
    def score(self, records: Sequence[Instruction], responses: Sequence[str]) -> list[float]:
        """One score per (record, response): the record gives the prompt and, where present, the references."""

    def score_one(self, record: Instruction, response: str) -> float:
        return self.score([record], [response])[0]


def question_text(record: Instruction) -> str:
    """The prompt as a reward model without a chat template reads it: the instruction, then its input after a blank
    line; a conversation's turns one after another, each after its role."""
    if len(record.context) > 1:
        return "\n\n".join(f"{role}: {content}" for role, content in record.context)
    return f"{record.instruction}\n\n{record.input}" if record.input.strip() else record.instruction


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _context(model: torch.nn.Module, default: int) -> int:
    cfg = model.config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or default


class RewardModelJudge(Judge):
    """A sequence-classification model with a single output; score = that logit for (question, response), or for
    the conversation with the response as its last turn, rendered by the reward model's chat template when it has
    one."""

    def __init__(self, path: str, batch_size: int = 16, max_length: int = 1024, device: str | None = None,
                 trust_remote_code: bool = False):
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise PrefkdError(f"cannot load a reward model (sequence classification) from '{path}': {e}") from None
        if self.model.config.num_labels != 1:
            raise PrefkdError(f"'{path}' has {self.model.config.num_labels} outputs; a reward-model judge needs a "
                              "model with one (num_labels=1) whose logit is the reward")
        if self.tokenizer.pad_token is None:  # GPT-2 style reward models: pad with EOS, the model finds the last token
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval().to(device or "cpu")
        self.name = f"reward-model:{path}"
        self.batch_size = batch_size
        self.max_length = min(max_length, _context(self.model, max_length),
                              int(min(getattr(self.tokenizer, "model_max_length", max_length), 1e9)))

    @torch.no_grad()
    def score(self, records: Sequence[Instruction], responses: Sequence[str]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(records), self.batch_size):
            recs, resp = records[start: start + self.batch_size], list(responses[start: start + self.batch_size])
            if getattr(self.tokenizer, "chat_template", None):  # a chat reward model reads the whole conversation
                texts = [self.tokenizer.apply_chat_template([*r.messages(), {"role": "assistant", "content": a}],
                                                            tokenize=False) for r, a in zip(recs, resp, strict=True)]
                enc = self.tokenizer(texts, add_special_tokens=False, padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
            else:
                enc = self.tokenizer([question_text(r) for r in recs], resp, padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
            logits = self.model(**{k: v.to(_device(self.model)) for k, v in enc.items()}).logits
            out.extend(float(x) for x in logits[:, 0].float().cpu())
        return out


class LogLikelihoodJudge(Judge):
    """Mean per-token log p(response + end token | prompt) under a causal LM (the teacher, or any local LM), the
    prompt rendered with its chat template when its tokenizer has one, else Alpaca."""

    def __init__(self, path: str, batch_size: int = 16, max_length: int = 1024, device: str | None = None,
                 trust_remote_code: bool = False):
        self.tokenizer = load_tokenizer(path, trust_remote_code)
        self.renderer = renderer_for(self.tokenizer)
        self.model = load_model(path, trust_remote_code).eval().to(device or "cpu")
        self.name = f"loglik:{path}"
        self.batch_size = batch_size
        self.max_length = min(max_length, _context(self.model, max_length))

    def _example(self, prompt_ids: list[int], response: str) -> Example:
        end = self.renderer.end_ids
        resp = self.renderer.encode([response])[0][: self.max_length - 1 - len(end)] + end
        room = self.max_length - len(resp)
        return Example(prompt_ids[-room:], resp)  # cut from the left, as generation does

    @torch.no_grad()
    def score(self, records: Sequence[Instruction], responses: Sequence[str]) -> list[float]:
        prompts = self.renderer.prompt_ids(records)
        examples = [self._example(p, r) for p, r in zip(prompts, responses, strict=True)]
        out: list[float] = []
        for start in range(0, len(examples), self.batch_size):
            batch = collate(examples[start: start + self.batch_size], self.tokenizer.pad_token_id)
            logps, mask = response_token_logps(self.model, {k: v.to(_device(self.model)) for k, v in batch.items()})
            out.extend(float(x) for x in (logps.sum(-1) / mask.sum(-1)).cpu())
        return out


class RougeJudge(Judge):
    """Rouge-L of the response against the record's references (needs references)."""

    name = "rouge"
    needs_references = True

    def score(self, records: Sequence[Instruction], responses: Sequence[str]) -> list[float]:
        missing = next((r for r in records if not r.references), None)
        if missing is not None:
            raise PrefkdError(f"the rouge judge needs references; record {missing.id or missing.instruction[:40]!r} "
                              "has none. Use a reward model or a log-likelihood judge on prompts without references")
        return [rouge_l(resp, r.references) for r, resp in zip(records, responses, strict=True)]


def judge_kind(path: str, kind: str = "auto", trust_remote_code: bool = False) -> str:
    if kind not in KINDS:
        raise ConfigError(f"unknown judge.kind '{kind}'; use one of {', '.join(KINDS)}")
    if path == "rouge" or kind == "rouge":
        return "rouge"
    if kind != "auto":
        return kind
    local = Path(path) / "config.json"
    try:
        archs = (json.loads(local.read_text(encoding="utf-8")).get("architectures") if local.is_file()
                 else AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).architectures) or []
    except (OSError, ValueError) as e:
        raise PrefkdError(f"cannot read the judge's config at '{path}': {e}; pass a model directory or hub id, or "
                          "judge.kind") from None
    return "reward-model" if any(a.endswith("ForSequenceClassification") for a in archs) else "loglik"


def make_judge(cfg: JudgeConfig, device: str | None = None) -> Judge | None:
    """The judge `cfg` names, or None when `cfg.path` is empty."""
    if not cfg.path:
        return None
    kind = judge_kind(cfg.path, cfg.kind, cfg.trust_remote_code)
    if kind == "rouge":
        return RougeJudge()
    cls = RewardModelJudge if kind == "reward-model" else LogLikelihoodJudge
    return cls(cfg.path, cfg.batch_size, cfg.max_length, device, cfg.trust_remote_code)


# ---- win rates (pure) --------------------------------------------------------------------------------------------


def preferences(scores_a: Sequence[float], scores_b: Sequence[float], texts_a: Sequence[str] | None = None,
                texts_b: Sequence[str] | None = None, tie_tolerance: float = 0.0) -> np.ndarray:
    """Per prompt: 100 if A is preferred, 0 if B is, 50 for a tie (|a - b| <= tie_tolerance, or identical texts)."""
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{a.shape} scores for A and {b.shape} for B")
    out = np.where(a - b > tie_tolerance, 100.0, np.where(b - a > tie_tolerance, 0.0, 50.0))
    if texts_a is not None and texts_b is not None:
        # Batched forward passes can differ in the last bits for the same text: an identical pair is a tie.
        same = np.array([x.strip() == y.strip() for x, y in zip(texts_a, texts_b, strict=True)], dtype=bool)
        out[same] = 50.0
    return out


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float], texts_a: Sequence[str] | None = None,
             texts_b: Sequence[str] | None = None, tie_tolerance: float = 0.0) -> float:
    """Share of prompts (x100) where A is preferred to B, ties counting half."""
    return float(preferences(scores_a, scores_b, texts_a, texts_b, tie_tolerance).mean())


def check_reference_free(judge: Judge) -> None:
    """A judge that compares with the references cannot compare a response with the references."""
    if judge.needs_references:
        raise PrefkdError(f"the {judge.name} judge scores responses against the references, so it cannot judge a "
                          "response against the references themselves; use a reward model or a log-likelihood judge")


def reference_scores(judge: Judge, records: Sequence[Instruction]) -> tuple[list[float], list[str]]:
    """(score, text) of each record's best-scoring reference under `judge`."""
    check_reference_free(judge)
    missing = next((r for r in records if not r.references), None)
    if missing is not None:
        raise PrefkdError(f"win rate against references: record {missing.id or missing.instruction[:40]!r} has none")
    flat = [(i, ref) for i, r in enumerate(records) for ref in r.references]
    scores = judge.score([records[i] for i, _ in flat], [ref for _, ref in flat])
    best: dict[int, tuple[float, str]] = {}
    for (i, ref), s in zip(flat, scores, strict=True):
        if i not in best or s > best[i][0]:
            best[i] = (s, ref)
    return [best[i][0] for i in range(len(records))], [best[i][1] for i in range(len(records))]


def judge_against_references(judge: Judge, records: Sequence[Instruction], predictions_per_seed: dict[int, list[str]],
                             tie_tolerance: float = 0.0) -> dict[str, np.ndarray]:
    """{"win_rate": [seeds, prompts] of 100/50/0, "judge_score": [seeds, prompts], "judge_reference": [prompts]}."""
    ref_scores, ref_texts = reference_scores(judge, records)
    wins, scores = [], []
    for preds in predictions_per_seed.values():
        s = judge.score(records, preds)
        scores.append(s)
        wins.append(preferences(s, ref_scores, preds, ref_texts, tie_tolerance))
    return {"win_rate": np.array(wins), "judge_score": np.array(scores, dtype=np.float64),
            "judge_reference": np.array(ref_scores, dtype=np.float64)}


def head_to_head(judge: Judge, records: Sequence[Instruction], responses_a: dict[int, list[str]],
                 responses_b: dict[int, list[str]], tie_tolerance: float = 0.0) -> dict[str, np.ndarray]:
    """A vs B on the same prompts, seed by seed (both dicts in the same seed order, or one side with one seed used
    against every seed of the other): {"win_rate": [seeds, prompts], "score_a": ..., "score_b": ...}."""
    a_seeds, b_seeds = list(responses_a), list(responses_b)
    if len(a_seeds) != len(b_seeds) and 1 not in (len(a_seeds), len(b_seeds)):
        raise PrefkdError(f"A has {len(a_seeds)} seeds and B {len(b_seeds)}; give both the same number, or one "
                          "side a single set of responses")
    n = max(len(a_seeds), len(b_seeds))
    pairs = [(a_seeds[min(k, len(a_seeds) - 1)], b_seeds[min(k, len(b_seeds) - 1)]) for k in range(n)]
    cache: dict[tuple[str, int], list[float]] = {}

    def scored(side: str, responses: dict[int, list[str]], seed: int) -> list[float]:
        if (side, seed) not in cache:
            cache[(side, seed)] = judge.score(records, responses[seed])
        return cache[(side, seed)]

    wins, sa, sb = [], [], []
    for a, b in pairs:
        sa.append(scored("a", responses_a, a))
        sb.append(scored("b", responses_b, b))
        wins.append(preferences(sa[-1], sb[-1], responses_a[a], responses_b[b], tie_tolerance))
    return {"win_rate": np.array(wins), "score_a": np.array(sa, dtype=np.float64),
            "score_b": np.array(sb, dtype=np.float64)}
