"""Benchmark 1: prefkd's DPKD step vs TRL's DPOTrainer step with the teacher as ref_model.

Same tiny GPT-2 student and teacher (the demo's sizes, briefly trained), the same pre-sampled pairs (token for
token: prefkd trains on the ids TRL's own tokenisation produced), the same batch (16 pairs, sequential order),
AdamW at the same learning rate, clipping at 1.0, fp32, CPU. Both compute the four sequence log-probs
(student with grad on y_t and y_s, teacher without); the losses differ only in DPKD's length normalisation.

Throughput: one TRL `train()` whose callback times each TRL step (from `on_step_begin` to `on_step_end`: forward,
backward, clip, optimizer and scheduler step) and then runs and times one prefkd step on the same batch, so the
two alternate step by step. prefkd runs its step three times: with the teacher scoring y_t and y_s as TRL does,
with log p(y_t) already known (what `teacher_samples=cached` gives from the second epoch on), and the way prefkd
computed it before this work (padded batches, logits on every position), for reference.
Peak memory: separate child processes, alternated; the peak RSS of the training steps (reset after loading).

TRL's configuration: `DPOConfig`'s defaults but for fp32 (its `bf16` default off), which in TRL 1.16 include
gradient checkpointing. Its fastest configuration on CPU (checkpointing off, `precompute_ref_log_probs=True`: see
`bench/dpkd_vs_trl_124m.py`) runs as a second `train()` against prefkd's step with both teacher log-probs computed
beforehand, the `*_fastest` figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import torch

from bench import common, fixtures
from prefkd.data.collate import Example, collate
from prefkd.generation import SamplingConfig
from prefkd.logprobs import _padded_response_token_logps
from prefkd.methods import MethodConfig, StepInputs
from prefkd.methods.dpkd import dpkd_pair_loss, pair_step, teacher_logps
from prefkd.models import load_model, load_tokenizer
from prefkd.train import adamw

BATCH = 16
LR = 5e-5


def _texts(tokenizer, pairs) -> list[dict]:
    eos = tokenizer.eos_token_id

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids[:-1] if ids and ids[-1] == eos else ids)

    return [{"prompt": tokenizer.decode(e.prompt_ids), "chosen": text(e.response_ids),
             "rejected": text(e.rejected_ids)} for e in pairs]


def trl_trainer(student, teacher, tokenizer, rows: list[dict], steps: int, out_dir: str, callbacks=(),
                config: str = "defaults"):
    """TRL's DPOTrainer in one of its configurations (`bench.dpkd_vs_trl_124m.trl_options`): its defaults
    (gradient checkpointing on) or its fastest on CPU (checkpointing off, reference log-probs precomputed)."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    from bench.dpkd_vs_trl_124m import trl_options

    datasets.disable_progress_bars()
    # TRL's configs default `gradient_checkpointing` (transformers renamed it `activation_checkpointing`): only that
    # warning is TRL's to fix; any other FutureWarning (prefkd's own calls included) still shows.
    warnings.filterwarnings("ignore", message="`gradient_checkpointing", category=FutureWarning)

    args = DPOConfig(output_dir=out_dir, per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR,
                     lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, beta=0.1, bf16=False,
                     use_cpu=True, logging_steps=10_000, save_strategy="no", report_to="none", seed=0,
                     train_sampling_strategy="sequential", dataloader_num_workers=0, disable_dropout=True,
                     disable_tqdm=True, **trl_options(config, torch.device("cpu")))
    return DPOTrainer(model=student, ref_model=teacher, args=args, train_dataset=datasets.Dataset.from_list(rows),
                      processing_class=tokenizer, callbacks=list(callbacks))


class PrefkdStep:
    """prefkd's DPKD step on given pairs (the method's step after sampling) plus backward, clip and AdamW."""

    def __init__(self, student, teacher, tokenizer, batches: list[dict]):
        self.student, self.teacher, self.batches = student, teacher, batches
        self.opt = adamw(student.parameters(), lr=LR)
        self.cfg = MethodConfig(kappa=1.0, replay=0.0)  # the paper's loss alone, as TRL's step has no anchor
        self.pad, self.eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.cpu = torch.device("cpu")
        self.p_t = []  # log p(y_t) per batch, as the teacher cache would hold it
        self.known = []  # (log p(y_t), log p(y_s)) per batch, as TRL's precompute_ref_log_probs holds them
        for b in batches:
            p_t, p_s = teacher_logps(teacher, b["prompt"], b["chosen"], [b["rejected"]], [None] * len(b["prompt"]),
                                     self.cpu)
            self.p_t.append(p_t.tolist())
            self.known.append((p_t, p_s))

    def step(self, k: int, cached: bool = False, padded: bool = False, precomputed: bool = False) -> float:
        b = self.batches[k % len(self.batches)]
        if padded:
            loss = self._padded_loss(b)
        else:
            examples = [Example(p, []) for p in b["prompt"]]
            inp = StepInputs(self.student, self.student, self.teacher, examples, SamplingConfig(), self.cfg,
                             self.pad, self.eos, self.cpu)
            if precomputed:
                p_t, p_s = self.known[k % len(self.batches)]
            else:
                known = self.p_t[k % len(self.batches)] if cached else [None] * len(examples)
                p_t, p_s = teacher_logps(self.teacher, b["prompt"], b["chosen"], [b["rejected"]], known, self.cpu)
            loss = pair_step(inp, b["chosen"], [b["rejected"]], dpkd_pair_loss, p_t, p_s).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def _padded_loss(self, b: dict) -> torch.Tensor:
        """The same loss the way prefkd computed it before this work: one padded [y_t; y_s] batch per model,
        logits on every position."""
        pairs = [Example(p, r) for p, r in zip(b["prompt"] * 2, b["chosen"] + b["rejected"], strict=True)]
        batch = collate(pairs, self.pad)
        q_tok, mask = _padded_response_token_logps(self.student, batch)
        with torch.no_grad():
            p = _padded_response_token_logps(self.teacher, batch)[0].sum(-1)
        q, n, h = q_tok.sum(-1), mask.sum(-1), len(b["prompt"])
        return dpkd_pair_loss(q[:h], q[h:], p[:h], p[h:], n[:h], n[h:], self.cfg)[0]


def _batches(ids: list[dict]) -> list[dict]:
    """TRL's tokenised rows (prompt_ids, chosen_ids, rejected_ids) as prefkd batches of BATCH pairs, in order."""
    out = []
    for s in range(0, len(ids) - BATCH + 1, BATCH):
        rows = ids[s: s + BATCH]
        out.append({k: [r[f"{k}_ids"] for r in rows] for k in ("prompt", "chosen", "rejected")})
    return out


def _ids_path() -> Path:
    return fixtures.CACHE / "dpkd-vs-trl-ids.json"


def _setup():
    t_path, s_path = fixtures.models()
    tokenizer = load_tokenizer(str(s_path))
    return t_path, s_path, tokenizer, _texts(tokenizer, fixtures.pairs())


def run(quick: bool) -> dict:
    # --quick: 8 timed steps (each of the 4 batches twice) instead of 32; 1 memory child per side (3 in a full run),
    # 8 steps each (fewer steps would lower TRL's peak: it still grows between steps 4 and 8).
    steps, warmup, rounds = (10, 2, 1) if quick else (34, 2, 3)
    t_path, s_path, tokenizer, rows = _setup()
    teacher_trl, teacher_pk = (load_model(str(t_path)).eval().requires_grad_(False) for _ in range(2))
    student_trl, student_pk = load_model(str(s_path)), load_model(str(s_path))
    times: dict[str, list[float]] = {"trl": [], "prefkd": [], "prefkd_cached": [], "prefkd_padded": [],
                                     "trl_fastest": [], "prefkd_precomputed": []}
    holder: dict = {}

    def after_trl_step(k: int, trl_s: float) -> None:
        if holder["config"] == "fastest":  # against prefkd with both teacher log-probs computed beforehand
            times["trl_fastest"].append(trl_s)
            times["prefkd_precomputed"].append(common.timed(lambda: holder["prefkd"].step(k, precomputed=True)))
            return
        times["trl"].append(trl_s)
        times["prefkd"].append(common.timed(lambda: holder["prefkd"].step(k)))
        times["prefkd_cached"].append(common.timed(lambda: holder["prefkd"].step(k, cached=True)))
        times["prefkd_padded"].append(common.timed(lambda: holder["prefkd"].step(k, padded=True)))

    timer = common.after_each_trainer_step(after_trl_step)

    with tempfile.TemporaryDirectory() as tmp:
        holder["config"] = "defaults"
        trainer = trl_trainer(student_trl, teacher_trl, tokenizer, rows, steps, tmp, [timer])
        ids = [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in trainer.train_dataset]
        _ids_path().write_text(json.dumps(ids))
        batches = _batches(ids)
        holder["prefkd"] = PrefkdStep(student_pk, teacher_pk, tokenizer, batches)
        load_before = common.load_avg()
        trainer.train()
        # TRL's fastest configuration on CPU, on fresh copies of the same weights (benchmark 10 says why these).
        holder["config"] = "fastest"
        teacher_fast = load_model(str(t_path)).eval().requires_grad_(False)
        trl_trainer(load_model(str(s_path)), teacher_fast, tokenizer, rows, steps, tmp, [timer],
                    config="fastest").train()
    med = {k: common.median(v[warmup:]) for k, v in times.items()}
    mem = common.run_children({name: ["-m", "bench.dpkd_vs_trl", "--child", name]
                               for name in ("prefkd", "trl", "trl_fastest")}, rounds)
    peak = {k: common.median([r["peak_kb"] for r in v]) for k, v in mem.items()}
    extra = {k: common.median([r["peak_kb"] - r["base_kb"] for r in v]) for k, v in mem.items()}
    tokens = [sum(len(p) + len(c) + len(p) + len(r) for p, c, r in zip(b["prompt"], b["chosen"], b["rejected"],
                                                                        strict=True)) for b in batches]
    figures = {
        "dpkd_step_vs_trl_dpo": round(med["trl"] / med["prefkd"], 2),
        "dpkd_step_cached_teacher_vs_trl_dpo": round(med["trl"] / med["prefkd_cached"], 2),
        "dpkd_step_peak_rss_vs_trl_dpo": round(peak["prefkd"] / peak["trl"], 3),
        "dpkd_step_peak_rss_extra_vs_trl_dpo": round(extra["prefkd"] / extra["trl"], 3),
        "dpkd_step_vs_trl_dpo_fastest": round(med["trl_fastest"] / med["prefkd_precomputed"], 2),
        "dpkd_step_peak_rss_vs_trl_dpo_fastest": round(peak["prefkd"] / peak["trl_fastest"], 3),
    }
    before = round(med["prefkd_padded"] / med["prefkd"], 2)
    settings = {"student": "gpt2 tiny (2x128), SFT 300 steps", "teacher": "gpt2 mini (3x192), SFT 300 steps",
                "vocab": len(tokenizer), "batch_pairs": BATCH, "pairs": len(ids), "lr": LR, "precision": "fp32",
                "timed_steps": steps - warmup, "warmup_steps": warmup, "memory_children_per_side": rounds,
                "memory_steps_per_child": 8, "threads": torch.get_num_threads(),
                "mean_tokens_per_batch_both_sequences": round(sum(tokens) / len(tokens)),
                "trl_version": __import__("trl").__version__,
                "trl_configurations": {"defaults": "DPOConfig defaults (gradient checkpointing on) but bf16 off; "
                                                   "the *_vs_trl_dpo figures without a suffix",
                                       "fastest": "gradient_checkpointing=False, precompute_ref_log_probs=True "
                                                  "(padding_free is unavailable in TRL 1.16's DPOTrainer, Liger "
                                                  "needs a GPU); against prefkd with both teacher log-probs "
                                                  "precomputed: the *_fastest figures"}}
    details = {"median_step_s": {k: round(v, 4) for k, v in med.items()},
               "pairs_per_s": {k: round(BATCH / v, 1) for k, v in med.items()},
               "previous_implementation_vs_prefkd": before,
               "peak_rss_mb": {k: round(v / 1024, 1) for k, v in peak.items()},
               "peak_rss_extra_mb": {k: round(v / 1024, 1) for k, v in extra.items()},
               "load_avg_start": load_before, "load_avg_end": common.load_avg()}
    common.save("dpkd_vs_trl", figures, settings, details)
    common.table("1. DPKD step vs TRL DPOTrainer step (same models, pairs, batch; CPU fp32)", [
        ("median step time TRL / prefkd", f"{figures['dpkd_step_vs_trl_dpo']}x", ">= 1.5x"),
        ("same, teacher log p(y_t) cached", f"{figures['dpkd_step_cached_teacher_vs_trl_dpo']}x", "report"),
        ("peak RSS prefkd / TRL", f"{figures['dpkd_step_peak_rss_vs_trl_dpo']}x", "<= 1.0x"),
        ("peak RSS above baseline prefkd / TRL", f"{figures['dpkd_step_peak_rss_extra_vs_trl_dpo']}x", "report"),
        ("pairs/s prefkd, TRL", f"{details['pairs_per_s']['prefkd']}, {details['pairs_per_s']['trl']}", ""),
        ("before this work (padded, all logits) / prefkd", f"{before}x", "report"),
        ("peak RSS MB prefkd, TRL", f"{details['peak_rss_mb']['prefkd']}, {details['peak_rss_mb']['trl']}", ""),
        ("TRL fastest (no checkpointing, ref log-probs precomputed) / prefkd (teacher log-probs precomputed)",
         f"{figures['dpkd_step_vs_trl_dpo_fastest']}x", "report"),
        ("peak RSS prefkd / TRL fastest", f"{figures['dpkd_step_peak_rss_vs_trl_dpo_fastest']}x", "report"),
    ])
    return figures


def child(side: str, steps: int = 8) -> None:
    """One side's training steps in a fresh process; prints its peak RSS over the steps."""
    common.set_threads()
    t_path, s_path, tokenizer, rows = _setup()
    student, teacher = load_model(str(s_path)), load_model(str(t_path)).eval().requires_grad_(False)
    if side.startswith("trl"):
        with tempfile.TemporaryDirectory() as tmp:
            trainer = trl_trainer(student, teacher, tokenizer, rows, steps, tmp,
                                  config="fastest" if side == "trl_fastest" else "defaults")
            base = common.reset_peak()
            trainer.train()
    else:
        prefkd = PrefkdStep(student, teacher, tokenizer, _batches(json.loads(_ids_path().read_text())))
        base = common.reset_peak()
        for k in range(steps):
            prefkd.step(k)
    common.child_report(base_kb=base)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=["prefkd", "trl", "trl_fastest"], required=True)
    child(parser.parse_args().child)
