"""Benchmark 12: decode throughput of prefkd's sampler at batch 16 on the 124M shape, as a fraction of the machine's
roofline for the same decode steps, both measured in the same run.

Measured: `generation.sample_responses` on a random-initialised GPT-2 of the shape (`bench/shapes.py`), 16 prompts
of the shape's lengths in one batch, temperature 1, no top-k / top-p, fp32. The end token is set to an id outside
the vocabulary, so no row leaves the batch: every decode step runs at batch 16. The time of the decode steps is
T(N new tokens) - T(1 new token) (the prefill and first draw are in both), over N - 1 steps, the two alternating;
it includes what the sampler does around the forward (logits processors, the draw, bookkeeping).

Roofline of decode step t (every row has p_i + t + 1 keys once its new token is in the cache; L layers, width d,
vocabulary V, batch B, fp32):
- FLOPs = 2 B (12 d^2 L + V d) + 4 d L sum_i (p_i + t + 1): the matmuls of every weight (q, k, v, o: 4 d^2;
  MLP: 8 d^2; the LM head: V d) and attention's scores and weighted sum over the cache;
- bytes = 4 (12 d^2 L + V d) + 8 d L sum_i (p_i + t + 1): every weight read once, and the cache's keys and values
  of the real tokens (left padding is not counted: the step need not read it);
- roofline time = max(FLOPs / peak matmul FLOP/s, bytes / memory bandwidth), where the peak is a square fp32
  `torch.matmul` (3072 on CPU, 8192 on a GPU) and the bandwidth the faster of a large `sum` (bytes read) and a large
  `copy_` (bytes read + written) over buffers far larger than the caches, all timed in this process between the
  sampling runs, at the run's thread count.
`sampling_roofline_fraction_124m` = sum_t roofline time / measured decode time. Biases, layer norms, the position
embedding and the softmax over the vocabulary are left out of both counts (under 1% of either at 124M).

The sampler runs as a user's does (`pack_weights` left to `packed_weights.worth_packing`: at 124M shape on a CPU the
decode steps multiply through MKL-packed weights, and the packing pass, once per call, counts in the decode time).

Where the rest goes: `weight_matmuls_s_per_decode_step` times the step's weight matmuls alone (every linear layer
and the LM head on `BATCH` rows of one token, in model order, each weight read once per sweep) and the weight bytes
they stream per second, beside the bandwidth above; `..._packed_...` the same sweep through packed weights;
`packing_pass_s` the packing of every weight (once per sampling call, so 1/(N - 1) of it in each decode step).
"""

from __future__ import annotations

import torch

from bench import common, shapes
from prefkd.generation import SamplingConfig, sample_responses
from prefkd.packed_weights import packed_linears, worth_packing

BATCH = 16


def decode_costs(arch: shapes.Arch, vocab: int, prompt_lengths: list[int], steps: int) -> list[tuple[float, float]]:
    """(FLOPs, bytes) of each of the `steps` decode steps after the prefill."""
    d, layers = arch.width, arch.layers
    weights = 12 * d * d * layers + vocab * d
    out = []
    for t in range(1, steps + 1):
        keys = sum(p + t + 1 for p in prompt_lengths)
        out.append((2 * len(prompt_lengths) * weights + 4 * d * layers * keys, 4 * weights + 8 * d * layers * keys))
    return out


def peak_flops(dev: torch.device, reps: int) -> float:
    n = 8192 if dev.type == "cuda" else 3072
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    return 2 * n**3 / _median_time(lambda: torch.matmul(a, b), dev, reps)


def bandwidth(dev: torch.device, reps: int) -> dict[str, float]:
    """Bytes per second of a `sum` (read) and a `copy_` (read + write) over buffers of 1 GiB (GPU) or 256 MiB."""
    n = (2**30 if dev.type == "cuda" else 2**28) // 4
    src, dst = torch.rand(n, device=dev), torch.empty(n, device=dev)
    return {"sum": 4 * n / _median_time(lambda: src.sum(), dev, reps),
            "copy": 8 * n / _median_time(lambda: dst.copy_(src), dev, reps)}


def weight_matmuls(model: torch.nn.Module, batch: int, dev: torch.device, reps: int) -> dict[str, float]:
    """Seconds and weight bytes per second of a decode step's weight matmuls alone: every linear layer of the model
    (GPT-2's Conv1D included) and the LM head applied in model order to `batch` rows of one token, so that each
    weight is read once per sweep, as in a decode step (the sweep is far larger than the caches)."""
    from transformers.pytorch_utils import Conv1D

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    inputs = [torch.randn(batch, m.weight.shape[0] if isinstance(m, Conv1D) else m.in_features, device=dev)
              for m in layers]
    nbytes = sum(m.weight.numel() * m.weight.element_size() for m in layers)

    def sweep():
        with torch.no_grad():
            for m, x in zip(layers, inputs, strict=True):
                m(x)

    seconds = _median_time(sweep, dev, reps)
    return {"seconds": seconds, "bytes_per_s": nbytes / seconds, "bytes": nbytes}


def _median_time(fn, dev: torch.device, reps: int) -> float:
    def call():
        fn()
        shapes.sync(dev)

    call()
    return common.median([common.timed(call) for _ in range(reps)])


def run(quick: bool, shape: str | None = None, device: str | None = None) -> dict:
    sh, dev = shapes.shape_for(shape, quick), shapes.device(device)
    tok = shapes.tokenizer(sh)
    model = shapes.build(sh.student, sh, tok, seed=0).to(dev).eval()
    prompts = [r["prompt"] for r in shapes.token_data(sh, tok, BATCH)]
    new = sh.max_new_tokens
    never = sh.vocab  # an end token no draw can give: every row decodes all `new` tokens
    configs = {n: SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n, batch_size=BATCH)
               for n in (1, new)}
    counts: list[int] = []

    def sampler(n: int):
        def call():
            out = sample_responses(model, prompts, configs[n], tok.pad_token_id, never, seed=0)
            shapes.sync(dev)
            counts.append(sum(map(len, out)))

        return call

    reps = 2 if quick else 5
    load_before = common.load_avg()
    times = common.alternate({"one": sampler(1), "all": sampler(new)}, reps=reps, warmup=1)
    assert max(counts) == BATCH * new and min(counts) in (BATCH, BATCH * new), counts  # no row ended early
    peak, bw = peak_flops(dev, reps + 1), bandwidth(dev, reps + 1)
    matmuls = weight_matmuls(model, BATCH, dev, reps + 1)
    with packed_linears(model, BATCH, True) as packed_layers:
        packed = weight_matmuls(model, BATCH, dev, reps + 1) if packed_layers else None

    def pack_once() -> None:
        with packed_linears(model, BATCH, True):
            pass

    packing_pass = _median_time(pack_once, dev, reps + 1)
    bw_best = max(bw.values())
    measured = (common.median(times["all"]) - common.median(times["one"])) / (new - 1)
    costs = decode_costs(sh.student, sh.vocab, [len(p) for p in prompts], new - 1)
    roof = [max(f / peak, b / bw_best) for f, b in costs]
    fraction = sum(roof) / len(roof) / measured
    bound = sum(f / peak >= b / bw_best for f, b in costs)
    figures = {shapes.key("sampling_roofline_fraction_124m", sh): round(fraction, 3)}
    settings = {"shape": sh.describe(), "device": str(dev), "weights": "random init (seed 0)", "batch": BATCH,
                "prompt_tokens": [len(p) for p in prompts], "new_tokens": new, "decode_steps": new - 1,
                "temperature": 1.0, "precision": "fp32", "reps": reps, "threads": torch.get_num_threads(),
                "packed_weights": worth_packing(model, new),
                "params": shapes.params(model),
                "formula": "fraction = sum_t max(FLOPs_t / peak, bytes_t / bandwidth) / measured decode time; "
                           "FLOPs_t = 2B(12d^2L + Vd) + 4dL sum_i(p_i+t+1), bytes_t = 4(12d^2L + Vd) + "
                           "8dL sum_i(p_i+t+1)"}
    details = {"measured_s_per_decode_step": round(measured, 5),
               "roofline_s_per_decode_step": round(sum(roof) / len(roof), 5),
               "tokens_per_s": round(BATCH / measured, 1),
               "peak_matmul_gflops": round(peak / 1e9, 1),
               "bandwidth_gb_per_s": {k: round(v / 1e9, 2) for k, v in bw.items()},
               "weight_matmuls_s_per_decode_step": round(matmuls["seconds"], 5),
               "weight_matmuls_gb_per_s": round(matmuls["bytes_per_s"] / 1e9, 2),
               "weight_matmuls_packed_s_per_decode_step": packed and round(packed["seconds"], 5),
               "weight_matmuls_packed_gb_per_s": packed and round(packed["bytes_per_s"] / 1e9, 2),
               "packing_pass_s": packed and round(packing_pass, 4),
               "steps_compute_bound": bound, "steps_memory_bound": len(costs) - bound,
               "mean_gflop_per_step": round(sum(f for f, _ in costs) / len(costs) / 1e9, 3),
               "mean_mb_per_step": round(sum(b for _, b in costs) / len(costs) / 1e6, 1),
               "median_s": {k: round(common.median(v), 3) for k, v in times.items()},
               "load_avg_start": load_before, "load_avg_end": common.load_avg()}
    common.save("sampling_roofline", figures, settings, details)
    name = sh.name if sh.name != "124m" else "GPT-2-small shape (124M)"
    common.table(f"12. Decode throughput of sample_responses, batch {BATCH}, {name}, {dev}, fp32", [
        ("roofline time / measured time per decode step", f"{fraction:.3f}", ">= 0.5"),
        ("measured, roofline s per decode step",
         f"{details['measured_s_per_decode_step']}, {details['roofline_s_per_decode_step']}", ""),
        ("tokens/s", str(details["tokens_per_s"]), ""),
        ("peak matmul GFLOP/s; bandwidth GB/s sum, copy",
         f"{details['peak_matmul_gflops']}; {details['bandwidth_gb_per_s']['sum']}, "
         f"{details['bandwidth_gb_per_s']['copy']}", ""),
        ("decode steps compute-bound, memory-bound", f"{bound}, {len(costs) - bound}", ""),
        ("the step's weight matmuls alone: s, weight GB/s",
         f"{details['weight_matmuls_s_per_decode_step']}, {details['weight_matmuls_gb_per_s']}", ""),
        ("the same through MKL-packed weights: s, weight GB/s",
         f"{details['weight_matmuls_packed_s_per_decode_step']}, {details['weight_matmuls_packed_gb_per_s']}", ""),
        ("the packing pass (once per sampling call), s", str(details["packing_pass_s"]), ""),
    ])
    return figures
