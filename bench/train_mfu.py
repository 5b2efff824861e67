"""Benchmark 5: model FLOP utilisation of an SFT step on the 6-layer d384 GPT-2 in fp32.

Achieved FLOP/s of prefkd's SFT step (the `sft` method's step, backward, clipping, AdamW) on batches of 16 D0
examples of the demo suite, divided by the peak fp32 matmul FLOP/s of the same process (a 3072 x 3072
`torch.matmul`), the two alternating. Model FLOPs per step follow the usual convention: 6 x parameters x tokens
(forward + backward; parameters without the position table, the tied embedding counted once as the LM head) plus
attention, 12 x layers x width x T^2 per sequence of T tokens; tokens are the real (unpadded) tokens. The padded
reference (one padded forward, logits on every position: what prefkd did before packing) is timed alongside.
`train_mfu_fp32` is at the run's thread count (BENCH_THREADS, 1 by default: the machine is shared), and the same
is measured with one thread per core (`train_mfu_fp32_<n>threads`): on a busy machine the two differ a lot.
"""

from __future__ import annotations

import os

import torch

from bench import common, fixtures
from prefkd.data.chat import Renderer
from prefkd.data.collate import collate, encode_examples
from prefkd.data.loaders import load_instructions
from prefkd.generation import SamplingConfig
from prefkd.logprobs import _padded_response_token_logps, token_mean_nll
from prefkd.methods import MethodConfig, StepInputs, get_method
from prefkd.models import SIZES, build_model, load_tokenizer
from prefkd.prefix_sharing import prefix_sharing
from prefkd.train import BatchStream, adamw

SIZE = "base"
BATCH = 16
MATMUL = 3072


def model_flops(examples, layers: int, width: int, params: int) -> float:
    lengths = [len(e.prompt_ids) + len(e.response_ids) for e in examples]
    return 6 * params * sum(lengths) + sum(12 * layers * width * t * t for t in lengths)


class SFTBench:
    """prefkd's SFT step (the `sft` method's step, backward, clipping, AdamW) on a fresh GPT-2 of `size`, with batches
    of D0 references in the loop's length-grouped order."""

    def __init__(self, size: str = SIZE):
        d = fixtures.data_dir()
        self.tokenizer = load_tokenizer(str(d / "tokenizer"))
        records = load_instructions(d / "d0.jsonl")
        renderer = Renderer(self.tokenizer, "alpaca")
        self.examples, _ = encode_examples(renderer.prompt_ids(records),
                                           [renderer.response_ids(r, r.references[0]) for r in records])
        self.model = build_model("gpt2", size, self.tokenizer, seed=0)
        self.opt = adamw(self.model.parameters(), lr=1e-4)
        self.stream = BatchStream([len(e.prompt_ids) + len(e.response_ids) for e in self.examples], BATCH, seed=0)
        self.sft = get_method("sft")

    def batch(self, k: int) -> list:
        return [self.examples[i] for i in self.stream.batch(k)]

    def step(self, batch: list, bf16: bool = False) -> None:
        inp = StepInputs(self.model, self.model, None, batch, SamplingConfig(), MethodConfig(),
                         self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, torch.device("cpu"))
        # Without template sharing: the FLOPs counted are those of every prompt whole, so they must all be computed
        # (sharing computes fewer and would inflate the utilisation; bench/train_prefix_sharing.py times it).
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), prefix_sharing(False):
            loss = self.sft.step(inp).loss
        self._finish(loss)

    def padded_step(self, batch: list) -> None:
        """The same loss the way prefkd computed it before this work: one padded forward, logits everywhere."""
        self._finish(token_mean_nll(*_padded_response_token_logps(self.model, collate(batch, 0))))

    def _finish(self, loss: torch.Tensor) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def run(quick: bool) -> dict:
    reps = 4 if quick else 10
    bench = SFTBench()
    layers, width, _ = SIZES[SIZE]
    params = sum(p.numel() for n, p in bench.model.named_parameters() if "wpe" not in n)
    a, b = torch.randn(MATMUL, MATMUL), torch.randn(MATMUL, MATMUL)
    run_threads = torch.get_num_threads()
    all_cores = os.cpu_count() or 1
    results = {}
    for threads in sorted({all_cores, 1}, reverse=True):
        torch.set_num_threads(threads)
        k = 0
        achieved, padded, peak = [], [], []
        for rep in range(reps + 1):  # the first round warms up
            batch = bench.batch(k)
            k += 1
            flops = model_flops(batch, layers, width, params)
            t_packed = common.timed(lambda bt=batch: bench.step(bt))
            t_mm = common.timed(lambda: torch.matmul(a, b))
            t_padded = common.timed(lambda bt=batch: bench.padded_step(bt))
            if rep:
                achieved.append(flops / t_packed)
                padded.append(flops / t_padded)
                peak.append(2 * MATMUL**3 / t_mm)
        results[threads] = {"achieved_gflops": common.median(achieved) / 1e9,
                            "padded_gflops": common.median(padded) / 1e9, "peak_gflops": common.median(peak) / 1e9}
    torch.set_num_threads(run_threads)
    for r in results.values():
        r["mfu"] = r["achieved_gflops"] / r["peak_gflops"]
        r["mfu_padded"] = r["padded_gflops"] / r["peak_gflops"]
    figures = {"train_mfu_fp32": round(results[run_threads]["mfu"], 3),
               f"train_mfu_fp32_{all_cores}threads": round(results[all_cores]["mfu"], 3)}
    settings = {"model": f"gpt2 {SIZE} (6x384)", "params_counted": params, "vocab": len(bench.tokenizer),
                "batch": BATCH, "data": "demo suite D0 references", "matmul": MATMUL, "reps": reps,
                "threads": run_threads,
                "threads_also_measured": all_cores, "flops": "6 x params x real tokens + 12 x layers x width x T^2"}
    details = {str(t): {k: round(v, 3) for k, v in r.items()} for t, r in results.items()}
    common.save("train_mfu", figures, settings, details)
    rows = []
    for t, r in sorted(results.items(), reverse=True):
        rows += [(f"MFU, {t} thread(s)", f"{r['mfu']:.3f}", ">= 0.40"),
                 (f"  achieved / peak GFLOP/s, {t} thread(s)", f"{r['achieved_gflops']:.1f} / {r['peak_gflops']:.1f}",
                  ""),
                 (f"  padded reference MFU, {t} thread(s)", f"{r['mfu_padded']:.3f}", "before")]
    common.table("5. SFT step on GPT-2 6x384, fp32: model FLOP/s / peak matmul FLOP/s", rows)
    return figures

