"""Benchmark 11: a whole on-policy step, sampling included: prefkd's `gkd` with lmbda = 1 against TRL's GKDTrainer
with lmbda = 1; and where the time of a fresh-sample DPKD step goes.

On-policy step: same random-initialised student and teacher (`bench/shapes.py`: GPT-2 small's shape, or `tiny`),
same prompts (token ids: TRL gets them through a collator that left-pads them, so nothing is tokenised twice),
same `max_new_tokens`, sampling settings (temperature 0.9, GKDTrainer's default, no top-k, top-p 1: TRL fixes
those two), batch, beta 0.5, divergence temperature 1 (TRL's loss takes none), AdamW at the same learning rate,
clipping at 1.0, fp32. A step is: sample a response per prompt with the student, run student and teacher on the
prompt + response, the generalised JSD on the response tokens, backward, clip, AdamW. prefkd's is the `gkd`
method's step (`methods.on_policy`) with `distill.gkd.lmbda=1`, `kappa=1`. Random models draw EOS with probability
~1/vocab, so at the 124M shape both sides sample `max_new_tokens` tokens per prompt (the mean is in `details`).

TRL 1.16 runs twice, each `train()` alternating step by step with prefkd's step on the same prompts:
- **defaults**: `GKDConfig` as shipped for speed (gradient checkpointing on) but for fp32 (TRL's `bf16` default
  off), the learning rate and lmbda = 1. With checkpointing on, GKDTrainer samples with `use_cache=False`: every
  new token reruns the whole sequence.
- **fastest**: checkpointing off, so sampling keeps a KV cache; `use_liger_kernel` where Liger is installed and
  the device is a GPU. GKDTrainer has no other speed option for this step (its collator is its own, so SFT's
  `padding_free` does not apply). `onpolicy_step_vs_trl_gkd` is this row: neither side checkpoints.
TRL's own warning points lmbda = 1, temperature 1 runs to its `DistillationTrainer`; that trainer is not measured
here.

DPKD step breakdown (`dpkd_fresh_step_breakdown`): the parts of `methods.dpkd.sampled_pairs` with
`teacher_samples=fresh` (Algorithm 1), run one after another and timed apart: teacher sampling, student sampling,
the forwards (the teacher scoring y_t and y_s, the student's packed forward), the backward, and clip + AdamW. At
the demo's sizes (the bench fixture's trained 2x128 student and 3x192 teacher, 8 of its prompts per step, up to 160
new tokens, the demo's setting) and at the benchmark's shape; shares of the summed median times.
"""

from __future__ import annotations

import tempfile
import time
import warnings

import torch

from bench import common, fixtures, shapes
from bench.dpkd_vs_trl_124m import liger_status
from prefkd.data.collate import Example
from prefkd.generation import SamplingConfig
from prefkd.methods import MethodConfig, StepInputs, get_method
from prefkd.methods.base import sample, sample_teacher
from prefkd.methods.dpkd import dpkd_pair_loss, pair_step, teacher_logps
from prefkd.methods.on_policy import GKDConfig as PrefkdGKD
from prefkd.train import adamw

LR = 5e-5
TEMPERATURE = 0.9  # GKDConfig's default sampling temperature
BETA = 0.5


def trl_options(config: str, dev: torch.device) -> dict:
    if config == "defaults":
        return {}
    opts: dict = {"gradient_checkpointing": False}
    if liger_status(dev) == "used":
        opts["use_liger_kernel"] = True
    return opts


def collator(pad: int):
    """GKDTrainer's inputs from prompt ids: the left-padded prompts (what it samples from); with lmbda = 1 the
    sequences it trains on are always its samples, so input_ids are the prompts. The labels are the prompt tokens:
    the Trainer counts the labels of the collated batch (before GKDTrainer replaces them by its samples) and
    GKDTrainer divides its loss by that count, so all-ignored labels would divide by zero (its own ChatML collator
    gives the reference's tokens there). The count only scales the loss."""

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["prompt_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r["prompt_ids"]):] = torch.tensor(r["prompt_ids"])
            mask[i, width - len(r["prompt_ids"]):] = 1
        return {"prompts": ids, "prompt_attention_mask": mask, "input_ids": ids.clone(), "attention_mask": mask.clone(),
                "labels": ids.masked_fill(mask == 0, -100)}

    return collate


def trl_trainer(config: str, student, teacher, tok, prompts: list[list[int]], shape: shapes.Shape, steps: int,
                out_dir: str, dev: torch.device, lengths: list[int], callbacks=()):
    import datasets
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class Counting(GKDTrainer):
        """GKDTrainer that records how many tokens each of its samples kept (up to and with EOS)."""

        @staticmethod
        def generate_on_policy_outputs(model, inputs, generation_config):
            ids, mask, labels = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            lengths.extend((labels != -100).sum(-1).tolist())
            return ids, mask, labels

    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", message="`gradient_checkpointing", category=FutureWarning)
    warnings.filterwarnings("ignore", message="`use_liger_kernel", category=FutureWarning)
    args = GKDConfig(output_dir=out_dir, per_device_train_batch_size=shape.batch, max_steps=steps, learning_rate=LR,
                     lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, bf16=False,
                     use_cpu=dev.type == "cpu", logging_steps=10_000, save_strategy="no", report_to="none", seed=0,
                     train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True, lmbda=1.0,
                     beta=BETA, temperature=TEMPERATURE, max_new_tokens=shape.max_new_tokens,
                     **trl_options(config, dev))
    return Counting(model=student, teacher_model=teacher, args=args, processing_class=tok,
                    train_dataset=datasets.Dataset.from_list([{"prompt_ids": p} for p in prompts]),
                    data_collator=collator(tok.pad_token_id), callbacks=list(callbacks))


class PrefkdGKDStep:
    """prefkd's `gkd` step with lmbda = 1 (student samples every batch) plus backward, clip 1.0 and AdamW."""

    def __init__(self, student, teacher, tok, prompts: list[list[int]], shape: shapes.Shape, dev: torch.device,
                 lengths: list[int]):
        self.student, self.teacher, self.prompts, self.shape, self.dev = student, teacher, prompts, shape, dev
        self.opt = adamw(student.parameters(), lr=LR)
        self.cfg = MethodConfig(kappa=1.0, replay=0.0, gkd=PrefkdGKD(beta=BETA, lmbda=1.0, temperature=1.0))
        self.sampling = sampling_config(shape, shape.max_new_tokens, TEMPERATURE)
        self.pad, self.eos = tok.pad_token_id, tok.eos_token_id
        self.method, self.lengths = get_method("gkd"), lengths

    def step(self, k: int) -> float:
        b = self.shape.batch
        batch = self.prompts[(k * b) % len(self.prompts):][:b]
        inp = StepInputs(self.student, self.student, self.teacher, [Example(p, []) for p in batch], self.sampling,
                         self.cfg, self.pad, self.eos, self.dev)
        out = self.method.step(inp)
        self.lengths.append(out.loss_count / b)  # response tokens scored, per prompt
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return out.loss.item()


def sampling_config(shape: shapes.Shape, max_new_tokens: int, temperature: float = 1.0) -> SamplingConfig:
    return SamplingConfig(temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                          batch_size=shape.batch)


def _steps(shape: shapes.Shape, quick: bool) -> dict[str, tuple[int, int]]:
    """(warm-up, timed) TRL steps per configuration. At 124M, TRL's defaults sample without a KV cache (minutes a
    step on one CPU thread): two steps, timed both (prefkd's side is warmed up before)."""
    if shape.name == "tiny":
        return {"defaults": (2, 4 if quick else 8), "fastest": (2, 4 if quick else 8)}
    return {"defaults": (0, 1 if quick else 2), "fastest": (1, 2 if quick else 4)}


def onpolicy(sh: shapes.Shape, dev: torch.device, quick: bool) -> tuple[dict, dict, dict]:
    steps = _steps(sh, quick)
    tok = shapes.tokenizer(sh)
    n = max(w + t for w, t in steps.values()) * sh.batch
    prompts = [r["prompt"] for r in shapes.token_data(sh, tok, n)]
    lengths: dict[str, list] = {"trl": [], "prefkd": []}
    student_pk, teacher_pk = shapes.models(sh, tok, dev)
    prefkd = PrefkdGKDStep(student_pk, teacher_pk, tok, prompts, sh, dev, lengths["prefkd"])
    prefkd.step(0)  # warm-up, untimed
    times: dict[str, list[float]] = {"trl_defaults": [], "prefkd_vs_defaults": [], "trl_fastest": [],
                                     "prefkd_vs_fastest": []}
    holder: dict = {}

    def after_trl_step(k: int, trl_s: float) -> None:
        times[f"trl_{holder['config']}"].append(trl_s)
        times[f"prefkd_vs_{holder['config']}"].append(common.timed(lambda: prefkd.step(k)))

    timer = common.after_each_trainer_step(after_trl_step, dev)

    load_before = common.load_avg()
    with tempfile.TemporaryDirectory() as tmp:
        for config in ("defaults", "fastest"):
            warmup, timed = steps[config]
            student, teacher = shapes.models(sh, tok, dev)
            holder["config"] = config
            trainer = trl_trainer(config, student, teacher, tok, prompts, sh, warmup + timed, tmp, dev,
                                  lengths["trl"], [timer])
            trainer.train()
            for name in (f"trl_{config}", f"prefkd_vs_{config}"):
                times[name] = times[name][warmup:]
            del trainer, student, teacher
    med = {k: common.median(v) for k, v in times.items()}
    figures = {
        shapes.key("onpolicy_step_vs_trl_gkd_124m", sh): round(med["trl_fastest"] / med["prefkd_vs_fastest"], 2),
        shapes.key("onpolicy_step_vs_trl_gkd_defaults_124m", sh):
            round(med["trl_defaults"] / med["prefkd_vs_defaults"], 2),
    }
    settings = {"shape": sh.describe(), "device": str(dev), "weights": "random init (seed 0 student, 1 teacher)",
                "prompts": n, "mean_prompt_tokens": round(sum(map(len, prompts)) / n, 1),
                "max_new_tokens": sh.max_new_tokens, "batch": sh.batch, "temperature": TEMPERATURE, "top_k": 0,
                "top_p": 1.0, "beta": BETA, "lmbda": 1.0, "lr": LR, "precision": "fp32",
                "steps": {k: {"warmup": w, "timed": t} for k, (w, t) in steps.items()},
                "trl": {"defaults": {"gradient_checkpointing": "True (TRL's default): samples with use_cache=False"},
                        "fastest": {**trl_options("fastest", dev), "liger": liger_status(dev)},
                        "not_measured": "DistillationTrainer (which TRL's GKD warning suggests for lmbda=1, "
                                        "temperature=1)"},
                "trl_version": __import__("trl").__version__, "threads": torch.get_num_threads()}
    details = {"median_step_s": {k: round(v, 3) for k, v in med.items()},
               "mean_sampled_tokens_per_prompt": {k: round(sum(v) / max(len(v), 1), 1) for k, v in lengths.items()},
               "load_avg_start": load_before, "load_avg_end": common.load_avg()}
    return figures, settings, details


PARTS = ("teacher_sampling", "student_sampling", "forwards", "backward", "optimizer")


def breakdown(student, teacher, prompts: list[list[int]], pad: int, eos: int, sampling: SamplingConfig, batch: int,
              dev: torch.device, warmup: int, reps: int) -> dict:
    """Median seconds of each part of a fresh-sample DPKD step (Algorithm 1, `methods.dpkd.sampled_pairs`), and
    their shares of the summed medians."""
    cfg = MethodConfig(kappa=1.0, replay=0.0)
    opt = adamw(student.parameters(), lr=LR)
    secs: dict[str, list[float]] = {p: [] for p in PARTS}
    lengths: list[float] = []

    def clock(part: str, fn):
        shapes.sync(dev)
        t0 = time.perf_counter()
        out = fn()
        shapes.sync(dev)
        secs[part].append(time.perf_counter() - t0)
        return out

    for k in range(warmup + reps):
        examples = [Example(p, []) for p in prompts[(k * batch) % len(prompts):][:batch]]
        inp = StepInputs(student, student, teacher, examples, sampling, cfg, pad, eos, dev)
        y_t = clock("teacher_sampling", lambda inp=inp, ex=examples: sample_teacher(ex, inp))
        y_s = clock("student_sampling", lambda inp=inp, ex=examples: sample(inp.student_sampler, ex, inp))
        lengths.append(sum(map(len, y_t + y_s)) / (2 * len(examples)))

        def forwards(inp=inp, y_t=y_t, y_s=y_s):
            p_t, p_s = teacher_logps(teacher, [e.prompt_ids for e in inp.examples], y_t, [y_s],
                                     [None] * len(y_t), dev)
            return pair_step(inp, y_t, [y_s], dpkd_pair_loss, p_t, p_s).loss

        loss = clock("forwards", forwards)
        clock("backward", loss.backward)

        def optimizer():
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        clock("optimizer", optimizer)
    med = {p: common.median(v[warmup:]) for p, v in secs.items()}
    total = sum(med.values())
    return {"shares": {p: round(v / total, 3) for p, v in med.items()},
            "median_s": {p: round(v, 4) for p, v in med.items()}, "step_s": round(total, 3),
            "mean_sampled_tokens": round(sum(lengths[warmup:]) / reps, 1), "prompts_per_step": batch,
            "max_new_tokens": sampling.max_new_tokens}


def demo_breakdown(dev: torch.device, quick: bool) -> dict:
    """At the demo's sizes: the bench fixture's trained models (they end at EOS), 8 suite prompts a step, up to 160
    new tokens, temperature 1 (the demo's DPKD stage)."""
    from prefkd.models import load_model, load_tokenizer

    t_path, s_path = fixtures.models()
    tok = load_tokenizer(str(s_path))
    student, teacher = load_model(str(s_path)).to(dev), load_model(str(t_path)).to(dev).eval().requires_grad_(False)
    prompts = [e.prompt_ids for e in fixtures.pairs()]
    sampling = SamplingConfig(max_new_tokens=160, batch_size=8)
    return breakdown(student, teacher, prompts, tok.pad_token_id, tok.eos_token_id, sampling, 8, dev, 2,
                     4 if quick else 8)


def shape_breakdown(sh: shapes.Shape, dev: torch.device, quick: bool) -> dict:
    tok = shapes.tokenizer(sh)
    student, teacher = shapes.models(sh, tok, dev)
    reps = (4 if quick else 8) if sh.name == "tiny" else (2 if quick else 3)
    prompts = [r["prompt"] for r in shapes.token_data(sh, tok, (reps + 1) * sh.batch)]
    return breakdown(student, teacher, prompts, tok.pad_token_id, tok.eos_token_id,
                     sampling_config(sh, sh.max_new_tokens), sh.batch, dev, 1, reps)


def run(quick: bool, shape: str | None = None, device: str | None = None) -> dict:
    sh, dev = shapes.shape_for(shape, quick), shapes.device(device)
    figures, settings, details = onpolicy(sh, dev, quick)
    parts = {"demo": demo_breakdown(dev, quick), sh.name: shape_breakdown(sh, dev, quick)}
    figures[shapes.key("dpkd_fresh_step_breakdown_124m", sh)] = {k: v["shares"] for k, v in parts.items()}
    settings["breakdown"] = {"demo": "fixture models (student gpt2 tiny 2x128, teacher gpt2 mini 3x192, SFT 300 "
                                     "steps), suite prompts, 8 per step, max_new_tokens 160, temperature 1",
                             sh.name: f"random-init models of the shape, {sh.batch} prompts per step, "
                                      f"max_new_tokens {sh.max_new_tokens}, temperature 1",
                             "parts": list(PARTS)}
    details["breakdown"] = parts
    common.save("onpolicy_vs_trl_gkd", figures, settings, details)
    k = {f: shapes.key(f, sh) for f in ("onpolicy_step_vs_trl_gkd_124m", "onpolicy_step_vs_trl_gkd_defaults_124m")}
    name = sh.name if sh.name != "124m" else "GPT-2-small shape (124M)"
    med = details["median_step_s"]
    rows = [("TRL GKDTrainer fastest (no checkpointing) / prefkd gkd, lmbda=1",
             f"{figures[k['onpolicy_step_vs_trl_gkd_124m']]}x", ">= 1.5x"),
            ("TRL GKDTrainer defaults (checkpointing: no KV cache) / prefkd",
             f"{figures[k['onpolicy_step_vs_trl_gkd_defaults_124m']]}x", "report"),
            ("median step s: TRL defaults, prefkd; TRL fastest, prefkd",
             f"{med['trl_defaults']}, {med['prefkd_vs_defaults']}; {med['trl_fastest']}, {med['prefkd_vs_fastest']}",
             ""),
            ("sampled tokens per prompt TRL, prefkd",
             ", ".join(str(v) for v in details["mean_sampled_tokens_per_prompt"].values()), "")]
    for size, d in parts.items():
        rows.append((f"DPKD fresh step, {size}: shares " + ", ".join(PARTS),
                     ", ".join(f"{d['shares'][p]:.2f}" for p in PARTS), f"step {d['step_s']} s"))
    common.table(f"11. On-policy step (sampling included), {name}, {dev}, fp32", rows)
    return figures
