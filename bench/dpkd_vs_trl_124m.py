"""Benchmark 10: prefkd's DPKD step vs TRL's DPOTrainer step at GPT-2-small shape, against TRL's defaults and its
fastest configuration.

Benchmark 1 (`dpkd_vs_trl`) compares on the demo's 0.7-1.8M-parameter models with 63-token prompts and answers of
4-7 tokens, where prompts and Python overhead dominate, and it leaves TRL 1.16's default gradient checkpointing on.
Here student and teacher are random-initialised GPT-2s of 124M parameters (12x768, vocabulary 50,257), prompts of
80-120 tokens and responses of 100-200 (Dolly's lengths), `shape.batch` pairs per step; with `--shape tiny` every
code path runs in seconds (no figure at scale).

TRL runs twice, each `train()` alternating step by step with prefkd's step on the same batch (the callback of
benchmark 1):
- **defaults**: `DPOConfig` as shipped but for what is not a speed setting (learning rate, schedule, logging,
  fp32: TRL's `bf16` default is turned off on both sides): gradient checkpointing on, the teacher (`ref_model`)
  run in every step. Against prefkd's step with the teacher scoring y_t and y_s in the step.
- **fastest**: checkpointing off (memory allows at this shape) and `precompute_ref_log_probs=True` (the teacher
  scores the whole data set once before training); `use_liger_kernel=True` where Liger is installed and the device
  is a GPU (Liger's kernels are Triton GPU kernels; none run on CPU). `padding_free` is left off: TRL 1.16's
  DPOTrainer turns it back off with a warning ("temporarily unavailable since the DPO refactor"). Against prefkd's
  step with both teacher log-probs computed before training too: the same memory strategy (neither side
  checkpoints) and the same work, so `dpkd_step_vs_trl_dpo_124m` is this row.
Peak memory: child processes alternated, each resetting its peak after loading and reporting it after the steps
(peak RSS on CPU, peak allocated memory on a GPU); prefkd's step (teacher in the step) against TRL's defaults
(checkpointing: TRL's leanest) gives `dpkd_step_peak_rss_vs_trl_dpo_124m`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import warnings
from pathlib import Path

import torch

from bench import common, fixtures, shapes
from prefkd.data.collate import Example
from prefkd.generation import SamplingConfig
from prefkd.methods import MethodConfig, StepInputs
from prefkd.methods.dpkd import dpkd_pair_loss, pair_step, teacher_logps
from prefkd.train import adamw

LR = 5e-5
BETA = 0.1


def trl_options(config: str, dev: torch.device) -> dict:
    """DPOConfig options of a TRL configuration beyond the shared ones."""
    if config == "defaults":
        return {}
    opts = {"gradient_checkpointing": False, "precompute_ref_log_probs": True}
    if dev.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        opts["use_liger_kernel"] = True
    return opts


def liger_status(dev: torch.device) -> str:
    if dev.type != "cuda":
        return "not used: Liger's kernels are Triton GPU kernels, none runs on CPU"
    return "used" if importlib.util.find_spec("liger_kernel") else "not used: liger-kernel is not installed"


def trl_trainer(config: str, student, teacher, tokenizer, rows: list[dict], steps: int, batch: int, out_dir: str,
                dev: torch.device, callbacks=()):
    import datasets
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", message="`gradient_checkpointing", category=FutureWarning)
    warnings.filterwarnings("ignore", message="`use_liger_kernel", category=FutureWarning)
    args = DPOConfig(output_dir=out_dir, per_device_train_batch_size=batch, max_steps=steps, learning_rate=LR,
                     lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, beta=BETA, bf16=False,
                     use_cpu=dev.type == "cpu", logging_steps=10_000, save_strategy="no", report_to="none", seed=0,
                     train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True,
                     **trl_options(config, dev))
    return DPOTrainer(model=student, ref_model=teacher, args=args, train_dataset=datasets.Dataset.from_list(rows),
                      processing_class=tokenizer, callbacks=list(callbacks))


def trl_settings(dev: torch.device) -> dict:
    """What each TRL configuration is, as the results state it."""
    shared = {"learning_rate": LR, "lr_scheduler_type": "constant", "max_grad_norm": 1.0, "beta": BETA,
              "loss_type": "sigmoid (default)", "bf16": False, "train_sampling_strategy": "sequential",
              "max_length": "1024 (default)"}
    return {"shared": shared,
            "defaults": {"gradient_checkpointing": "True (TRL's default)", "precompute_ref_log_probs": False,
                         "padding_free": False, "use_liger_kernel": False},
            "fastest": {**{"padding_free": "False: unavailable in TRL 1.16's DPOTrainer (it warns and pads)",
                           "use_liger_kernel": False},
                        **trl_options("fastest", dev), "liger": liger_status(dev)}}


class PrefkdStep:
    """prefkd's DPKD step on given pairs (`methods.dpkd.teacher_logps` + `pair_step`) plus backward, clip 1.0 and
    AdamW, on `dev`; `precomputed` gives it both teacher log-probs computed before training, as TRL's
    `precompute_ref_log_probs` does."""

    def __init__(self, student, teacher, tokenizer, batches: list[dict], dev: torch.device):
        self.student, self.teacher, self.batches, self.dev = student, teacher, batches, dev
        self.opt = adamw(student.parameters(), lr=LR)
        self.cfg = MethodConfig(kappa=1.0, replay=0.0)
        self.pad, self.eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.known: list[tuple[torch.Tensor, torch.Tensor]] = []

    def precompute(self) -> None:
        for b in self.batches:
            self.known.append(teacher_logps(self.teacher, b["prompt"], b["chosen"], [b["rejected"]],
                                            [None] * len(b["prompt"]), self.dev))

    def step(self, k: int, precomputed: bool = False) -> float:
        b = self.batches[k % len(self.batches)]
        inp = StepInputs(self.student, self.student, self.teacher, [Example(p, []) for p in b["prompt"]],
                         SamplingConfig(), self.cfg, self.pad, self.eos, self.dev)
        if precomputed:
            p_t, p_s = self.known[k % len(self.batches)]
        else:
            p_t, p_s = teacher_logps(self.teacher, b["prompt"], b["chosen"], [b["rejected"]],
                                     [None] * len(b["prompt"]), self.dev)
        loss = pair_step(inp, b["chosen"], [b["rejected"]], dpkd_pair_loss, p_t, p_s).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        value = loss.item()  # waits for the device
        return value


def batches_of(ids: list[dict], batch: int) -> list[dict]:
    """TRL's tokenised rows (prompt_ids, chosen_ids, rejected_ids) as prefkd batches, in TRL's sequential order."""
    return [{k: [r[f"{k}_ids"] for r in ids[s: s + batch]] for k in ("prompt", "chosen", "rejected")}
            for s in range(0, len(ids) - batch + 1, batch)]


def _ids_path(shape: shapes.Shape) -> Path:
    return fixtures.CACHE / f"dpkd-vs-trl-{shape.name}-ids.json"


def _steps(shape: shapes.Shape, quick: bool) -> tuple[int, int]:
    """(warm-up, timed) steps per TRL configuration: a 124M step takes tens of seconds on one CPU thread."""
    warmup, timed = (1, 4) if shape.name != "tiny" else (2, 8)
    return warmup, max(2, timed // 2) if quick else timed


def run(quick: bool, shape: str | None = None, device: str | None = None) -> dict:
    sh, dev = shapes.shape_for(shape, quick), shapes.device(device)
    warmup, timed = _steps(sh, quick)
    steps = warmup + timed
    tok = shapes.tokenizer(sh)
    rows = shapes.text_data(sh, tok, steps * sh.batch)
    rounds = 1 if quick else 2
    student_pk, teacher_pk = shapes.models(sh, tok, dev)
    times: dict[str, list[float]] = {"trl_defaults": [], "prefkd": [], "trl_fastest": [], "prefkd_precomputed": []}
    holder: dict = {}

    def after_trl_step(k: int, trl_s: float) -> None:
        times[f"trl_{holder['config']}"].append(trl_s)
        name = "prefkd" if holder["config"] == "defaults" else "prefkd_precomputed"
        times[name].append(common.timed(lambda: holder["prefkd"].step(k, precomputed=name != "prefkd")))

    timer = common.after_each_trainer_step(after_trl_step, dev)

    load_before = common.load_avg()
    ids: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in ("defaults", "fastest"):
            student, teacher = shapes.models(sh, tok, dev)
            holder["config"] = config
            trainer = trl_trainer(config, student, teacher, tok, rows, steps, sh.batch, tmp, dev, [timer])
            if not ids:
                ids = [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in trainer.train_dataset]
                _ids_path(sh).parent.mkdir(parents=True, exist_ok=True)
                _ids_path(sh).write_text(json.dumps(ids))
                holder["prefkd"] = PrefkdStep(student_pk, teacher_pk, tok, batches_of(ids, sh.batch), dev)
                holder["prefkd"].precompute()
            trainer.train()
            del trainer, student, teacher
    med = {k: common.median(v[warmup:]) for k, v in times.items()}
    mem = common.run_children({name: ["-m", "bench.dpkd_vs_trl_124m", "--child", name, "--shape", sh.name,
                                      "--device", dev.type] for name in ("prefkd", "trl_defaults", "trl_fastest")},
                              rounds, timeout=3600)
    peak = {k: common.median([r["peak_kb"] for r in v]) for k, v in mem.items()}
    extra = {k: common.median([r["peak_kb"] - r["base_kb"] for r in v]) for k, v in mem.items()}
    lengths = {part: round(sum(len(r[f"{part}_ids"]) for r in ids) / len(ids), 1)
               for part in ("prompt", "chosen", "rejected")}
    figures = {
        shapes.key("dpkd_step_vs_trl_dpo_124m", sh): round(med["trl_fastest"] / med["prefkd_precomputed"], 2),
        shapes.key("dpkd_step_vs_trl_dpo_defaults_124m", sh): round(med["trl_defaults"] / med["prefkd"], 2),
        shapes.key("dpkd_step_peak_rss_vs_trl_dpo_124m", sh): round(peak["prefkd"] / peak["trl_defaults"], 3),
        shapes.key("dpkd_step_peak_rss_vs_trl_dpo_fastest_124m", sh): round(peak["prefkd"] / peak["trl_fastest"], 3),
    }
    student_params = shapes.params(student_pk)
    settings = {"shape": sh.describe(), "device": str(dev), "student_params": student_params,
                "teacher_params": shapes.params(teacher_pk), "weights": "random init (seed 0 student, 1 teacher)",
                "tokenizer_tokens": len(tok), "pairs": len(ids), "mean_tokens": lengths, "precision": "fp32",
                "warmup_steps": warmup, "timed_steps": timed, "memory_children_per_side": rounds,
                "memory_steps_per_child": 2, "threads": torch.get_num_threads(), "trl": trl_settings(dev),
                "trl_version": __import__("trl").__version__,
                "memory": "peak RSS (CPU) or peak allocated (GPU) of the training steps; prefkd's teacher in the step"}
    details = {"median_step_s": {k: round(v, 3) for k, v in med.items()},
               "pairs_per_s": {k: round(sh.batch / v, 2) for k, v in med.items()},
               "peak_mb": {k: round(v / 1024, 1) for k, v in peak.items()},
               "peak_above_loaded_models_mb": {k: round(v / 1024, 1) for k, v in extra.items()},
               "load_avg_start": load_before, "load_avg_end": common.load_avg()}
    common.save("dpkd_vs_trl_124m", figures, settings, details)
    name = sh.name if sh.name != "124m" else "GPT-2-small shape (124M)"
    k = {f: shapes.key(f, sh) for f in ("dpkd_step_vs_trl_dpo_124m", "dpkd_step_vs_trl_dpo_defaults_124m",
                                          "dpkd_step_peak_rss_vs_trl_dpo_124m",
                                          "dpkd_step_peak_rss_vs_trl_dpo_fastest_124m")}
    common.table(f"10. DPKD step vs TRL DPOTrainer, {name}, {dev}, fp32, {sh.batch} pairs per step", [
        ("TRL fastest (no checkpointing, ref log-probs precomputed) / prefkd (teacher log-probs precomputed)",
         f"{figures[k['dpkd_step_vs_trl_dpo_124m']]}x", ">= 1.5x"),
        ("TRL defaults (checkpointing, ref_model in the step) / prefkd (teacher in the step)",
         f"{figures[k['dpkd_step_vs_trl_dpo_defaults_124m']]}x", "report"),
        ("peak memory prefkd / TRL defaults", f"{figures[k['dpkd_step_peak_rss_vs_trl_dpo_124m']]}x", "<= 1.0x"),
        ("peak memory prefkd / TRL fastest", f"{figures[k['dpkd_step_peak_rss_vs_trl_dpo_fastest_124m']]}x",
         "report"),
        ("median step s: TRL defaults, prefkd, TRL fastest, prefkd precomputed",
         ", ".join(str(details["median_step_s"][n]) for n in times), ""),
        ("peak MB: prefkd, TRL defaults, TRL fastest", ", ".join(str(details["peak_mb"][n]) for n in peak), ""),
        ("TRL fastest configuration", json.dumps(trl_options("fastest", dev)), liger_status(dev)),
        ("mean tokens prompt, chosen, rejected", ", ".join(str(v) for v in lengths.values()), ""),
    ])
    return figures


def child(side: str, shape: str, device: str, steps: int = 2) -> None:
    """One side's training steps in a fresh process; prints its peak memory over the steps."""
    common.set_threads()
    sh, dev = shapes.SHAPES[shape], shapes.device(device)
    tok = shapes.tokenizer(sh)
    student, teacher = shapes.models(sh, tok, dev)
    with tempfile.TemporaryDirectory() as tmp:
        if side.startswith("trl_"):
            rows = shapes.text_data(sh, tok, steps * sh.batch)
            trainer = trl_trainer(side[4:], student, teacher, tok, rows, steps, sh.batch, tmp, dev)
            base = _reset(dev)
            trainer.train()
        else:
            prefkd = PrefkdStep(student, teacher, tok, batches_of(json.loads(_ids_path(sh).read_text()), sh.batch),
                                dev)
            base = _reset(dev)
            for k in range(steps):
                prefkd.step(k)
    if dev.type == "cuda":
        print(json.dumps({"peak_kb": torch.cuda.max_memory_allocated(dev) // 1024, "base_kb": base}), flush=True)
    else:
        common.child_report(base_kb=base)


def _reset(dev: torch.device) -> int:
    """Reset the peak; returns the memory in use now, in kB."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        return torch.cuda.memory_allocated(dev) // 1024
    shapes.trim()
    return common.reset_peak()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=["prefkd", "trl_defaults", "trl_fastest"], required=True)
    parser.add_argument("--shape", choices=list(shapes.SHAPES), required=True)
    parser.add_argument("--device", default="cpu")
    a = parser.parse_args()
    child(a.child, a.shape, a.device)
