"""Benchmark 10: the suite's DPKD step forwards + backward with the shared template run once per batch, against the
same step with each prompt run whole.

The suite fixture's models (GPT-2 tiny student, mini teacher) and 64 pairs (y_t from the teacher, y_s from the
student), batches of 16 pairs in order, fp32, CPU. One step: the teacher scores y_t and y_s without grad
(`teacher_logps`), the student scores both with grad (`pair_step`: one packed forward of prompt -> [y_t, y_s]),
then backward of the loop's mix kappa L + (1 - kappa) anchor. No optimizer step: both sides see the same weights,
so their losses must agree (checked, with the student's per-token log-probs, within float32 rounding). The two
sides alternate batch by batch, each first in turn (`prefix_sharing(False)` for the plain one); the figure is the
ratio of their median step times.
"""

from __future__ import annotations

import platform

import torch

from bench import common, fixtures
from prefkd.data.collate import Example
from prefkd.generation import SamplingConfig
from prefkd.logprobs import group_token_logps
from prefkd.methods import MethodConfig, StepInputs
from prefkd.methods.dpkd import dpkd_pair_loss, pair_step, teacher_logps
from prefkd.models import load_model, load_tokenizer
from prefkd.prefix_sharing import find_shared, prefix_sharing

BATCH = 16
CPU = torch.device("cpu")


class DPKDStep:
    """The DPKD step's forwards and backward on fixed pairs (the method's step after sampling)."""

    def __init__(self) -> None:
        t_path, s_path = fixtures.models()
        tokenizer = load_tokenizer(str(s_path))
        self.student = load_model(str(s_path))
        self.teacher = load_model(str(t_path)).eval().requires_grad_(False)
        self.cfg = MethodConfig()
        self.pad, self.eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        pairs = fixtures.pairs()
        self.batches = [pairs[s: s + BATCH] for s in range(0, len(pairs) - BATCH + 1, BATCH)]

    def step(self, k: int) -> float:
        prompts, y_t, y_s = self._pairs(k)
        inp = StepInputs(self.student, self.student, self.teacher, [Example(p, []) for p in prompts],
                         SamplingConfig(), self.cfg, self.pad, self.eos, CPU)
        p_t, p_s = teacher_logps(self.teacher, prompts, y_t, y_s, [None] * len(prompts), CPU)
        out = pair_step(inp, y_t, y_s, dpkd_pair_loss, p_t, p_s)
        loss = self.cfg.kappa * out.loss + (1 - self.cfg.kappa) * out.anchor_nll
        loss.backward()
        self.student.zero_grad(set_to_none=True)
        return loss.item()

    def token_logp_diff(self, k: int) -> float:
        """Largest difference between the student's per-token log-probs of y_t and y_s with and without sharing."""
        prompts, y_t, y_s = self._pairs(k)
        with torch.no_grad():
            shared, _ = group_token_logps(self.student, prompts, [y_t, *y_s])
            with prefix_sharing(False):
                plain, _ = group_token_logps(self.student, prompts, [y_t, *y_s])
        return (shared - plain).abs().max().item()

    def _pairs(self, k: int) -> tuple[list[list[int]], list[list[int]], list[list[list[int]]]]:
        batch = self.batches[k % len(self.batches)]
        return [e.prompt_ids for e in batch], [e.response_ids for e in batch], [[e.rejected_ids for e in batch]]


def _tokens(batch: list[Example]) -> tuple[int, int]:
    """Tokens the student's packed forward computes per batch: prompts whole, and with the shared prefixes once."""
    prompts = [e.prompt_ids for e in batch]
    responses = sum(len(e.response_ids) + len(e.rejected_ids) for e in batch)
    plain = sum(map(len, prompts)) + responses
    found = find_shared(prompts)
    saved = 0 if found is None else int(found.shared.sum()) - sum(map(len, found.prefixes))
    return plain, plain - saved


def run(quick: bool) -> dict:
    rounds, warmup = (6, 1) if quick else (15, 1)
    bench = DPKDStep()
    times: dict[str, list[float]] = {"shared": [], "plain": []}
    diffs = []
    load_before = common.load_avg()
    for r in range(rounds + warmup):
        for k in range(len(bench.batches)):
            loss = {}
            for side in ("shared", "plain") if (r + k) % 2 == 0 else ("plain", "shared"):  # neither always first
                with prefix_sharing(side == "shared"):
                    t0 = common.time.perf_counter()
                    loss[side] = bench.step(k)
                    if r >= warmup:
                        times[side].append(common.time.perf_counter() - t0)
            diffs.append(abs(loss["shared"] - loss["plain"]))
    med = {k: common.median(v) for k, v in times.items()}
    tokens = [_tokens(b) for b in bench.batches]
    figures = {"train_prefix_sharing_speedup": round(med["plain"] / med["shared"], 2)}
    settings = {"student": "gpt2 tiny (2x128), SFT 300 steps", "teacher": "gpt2 mini (3x192), SFT 300 steps",
                "batch_pairs": BATCH, "batches": len(bench.batches), "rounds": rounds, "warmup_rounds": warmup,
                "precision": "fp32", "threads": torch.get_num_threads(),
                "timed": "teacher_logps + pair_step + backward, no optimizer step"}
    details = {"median_step_s": {k: round(v, 4) for k, v in med.items()},
               "tokens_per_batch_plain": round(sum(t[0] for t in tokens) / len(tokens)),
               "tokens_per_batch_shared": round(sum(t[1] for t in tokens) / len(tokens)),
               "max_abs_loss_diff": max(diffs),
               "max_abs_token_logp_diff": max(bench.token_logp_diff(k) for k in range(len(bench.batches))),
               "cpu": common.machine()["cpu"],
               "load_avg_start": load_before, "load_avg_end": common.load_avg()}
    common.save("train_prefix_sharing", figures, settings, details)
    common.console.print(f"CPU: {details['cpu']} ({platform.machine()}), load average {load_before} -> "
                         f"{details['load_avg_end']}")
    common.table("10. DPKD step forwards + backward: shared template once per batch vs each prompt whole", [
        ("median step time plain / shared", f"{figures['train_prefix_sharing_speedup']}x", ">= 1.2x"),
        ("median step s plain, shared", f"{details['median_step_s']['plain']}, {details['median_step_s']['shared']}",
         ""),
        ("student tokens per batch plain, shared", f"{details['tokens_per_batch_plain']}, "
                                                   f"{details['tokens_per_batch_shared']}", ""),
        ("max |loss shared - loss plain|", f"{details['max_abs_loss_diff']:.2e}", "<= 1e-5"),
        ("max |token log-prob shared - plain|", f"{details['max_abs_token_logp_diff']:.2e}", "<= 1e-5"),
    ])
    return figures
