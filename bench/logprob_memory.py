"""Benchmark 2: peak extra memory of prefkd's chunked selective log-softmax vs a full log_softmax + gather.

Per-token log-probs of a [8, 512] batch with GPT-2's vocabulary (50,257) in fp32: the logits alone are 823 MB.
Each measurement is a fresh child process that builds the logits, resets its peak RSS, computes the log-probs one
way and reports the peak above that point; the two ways alternate. The exactness (max abs difference) is measured
in this process on the same logits.
"""

from __future__ import annotations

import argparse

import torch

from bench import common
from prefkd.logprobs import CHUNK_ELEMENTS, selective_log_softmax

SHAPE = (8, 512)
VOCAB = 50_257


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*SHAPE, VOCAB, generator=g) * 3
    labels = torch.randint(0, VOCAB, SHAPE, generator=g)
    return logits, labels


def full(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def run(quick: bool) -> dict:
    rounds = 2 if quick else 4
    mem = common.run_children({name: ["-m", "bench.logprob_memory", "--child", name]
                               for name in ("chunked", "full")}, rounds)
    extra = {k: common.median([r["peak_kb"] - r["base_kb"] for r in v]) for k, v in mem.items()}
    logits, labels = _inputs()
    chunked_out, full_out = selective_log_softmax(logits, labels), full(logits, labels)
    diff = (chunked_out - full_out).abs().max().item()
    # Accuracy against float64 on two rows, and the autograd form (logit - logsumexp) against both.
    few, few_labels = logits[:2], labels[:2]
    exact = torch.log_softmax(few.double(), -1).gather(-1, few_labels.unsqueeze(-1)).squeeze(-1)
    grad_form = selective_log_softmax(few.clone().requires_grad_(True), few_labels).detach()
    accuracy = {"full_vs_float64": (full_out[:2].double() - exact).abs().max().item(),
                "chunked_vs_float64": (chunked_out[:2].double() - exact).abs().max().item(),
                "autograd_form_vs_float64": (grad_form.double() - exact).abs().max().item(),
                "autograd_form_vs_full": (grad_form - full_out[:2]).abs().max().item()}
    times = common.alternate({"chunked": lambda: selective_log_softmax(logits, labels),
                              "full": lambda: full(logits, labels)}, reps=3 if quick else 5)
    med = {k: common.median(v) for k, v in times.items()}
    figures = {"logprob_chunked_memory_ratio": round(extra["chunked"] / extra["full"], 4),
               "logprob_max_abs_diff": float(f"{diff:.3g}")}
    logits_mb = logits.numel() * 4 / 2**20
    settings = {"shape": list(SHAPE), "vocab": VOCAB, "dtype": "float32", "chunk_elements": CHUNK_ELEMENTS,
                "children_per_side": rounds, "threads": torch.get_num_threads()}
    details = {"peak_extra_mb": {k: round(v / 1024, 1) for k, v in extra.items()},
               "logits_mb": round(logits_mb, 1), "median_s": {k: round(v, 3) for k, v in med.items()},
               "chunked_speed_vs_full": round(med["full"] / med["chunked"], 2),
               "max_abs_error": {k: float(f"{v:.3g}") for k, v in accuracy.items()}}
    common.save("logprob_memory", figures, settings, details)
    common.table("2. Per-token log-probs of [8, 512] x 50,257 (fp32): chunked vs full log_softmax + gather", [
        ("peak extra memory chunked / full", f"{figures['logprob_chunked_memory_ratio']}x", "<= 0.25x"),
        ("max abs difference", f"{figures['logprob_max_abs_diff']:.2e}", "<= 1e-5"),
        ("peak extra MB chunked, full", f"{details['peak_extra_mb']['chunked']}, {details['peak_extra_mb']['full']}",
         f"logits {details['logits_mb']} MB"),
        ("time full / chunked", f"{details['chunked_speed_vs_full']}x", "report"),
    ])
    return figures


def child(way: str) -> None:
    common.set_threads()
    logits, labels = _inputs()
    base = common.reset_peak()
    out = selective_log_softmax(logits, labels) if way == "chunked" else full(logits, labels)
    common.child_report(base_kb=base, checksum=float(out.sum()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=["chunked", "full"], required=True)
    child(parser.parse_args().child)
