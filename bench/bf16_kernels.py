"""Why bf16 autocast is (or is not) faster than fp32 on this CPU: the kernels, shapes and costs behind benchmark 6.

`python -m bench.bf16_kernels [--quick] [--threads N ...] [--only PART ...] [--profile]` prints, for the machine it
runs on (medians of alternating repetitions after a warm-up; speed-ups are fp32 time / bf16 time):

- `kernels`: torch's CPU capability, the AMX and AVX-512-bf16 flags, and which kernel a bf16 matmul runs (a child
  with `ONEDNN_VERBOSE=1`; fp32 matmuls go to MKL, which oneDNN's log does not show);
- `matmuls`: GPT-2's matmuls (`addmm`: qkv, attention out, MLP in and out; the LM head) forward + backward at 1,024
  tokens (a training forward; 256 for GPT-2 small's LM head) and forward at 8 rows (a decoding step), for the
  widths of the demo's models (128, 192), the 6x384 models and GPT-2 small (768): fp32, bf16 autocast (its casts
  of the fp32 weights included) and bf16 tensors (the kernel alone);
- `new_shapes`: a bf16 matmul at a row count it has not seen before against one it has: oneDNN builds (JIT-compiles)
  a kernel for every new shape, and prefkd's packed batches have a new token count at every step; and a child's
  `ONEDNN_VERBOSE=all` count of one bf16 SFT step of the 2x128 model (kernels built, their time, the run time);
- `casts`: casting a model's weights to bf16 once (what autocast does per step for the student) against the fp32
  forward + backward it speeds up, and against a decoding step (autocast casts a frozen teacher's weights again at
  every call: it caches casts of weights that require grad only);
- `attention`: `scaled_dot_product_attention` forward + backward with a padding mask, fp32 vs bf16;
- `steps`: prefkd's SFT step (benchmark 5's, `bench.train_mfu.SFTBench`) at 2x128, 3x192 and 6x384, fp32 vs
  autocast; and `sample_responses` of the fixture models (8 prompts, up to 160 new tokens), fp32 vs under
  autocast, for a frozen teacher and a trainable student, as a DPKD step samples.

`--threads 1 2` repeats the timed parts at each thread count. `--profile` adds torch.profiler's self CPU time by
kind of op over DPKD steps of benchmark 6's demo-size run. Nothing goes to `bench/results.json`: these figures
explain benchmark 6, they are not targets.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import common

# (name, layers, width, heads, vocabulary): the demo's student and teacher, the 6x384 models, GPT-2 small
SIZES = [("2x128", 2, 128, 2, 2048), ("3x192", 3, 192, 3, 2048), ("6x384", 6, 384, 6, 2048),
         ("12x768", 12, 768, 12, 50_257)]
TOKENS = 1024  # tokens of a training forward (a demo DPKD step's forwards hold ~1,000-2,000 packed tokens)
BIG_TOKENS = 256  # GPT-2 small's LM head and whole model on 1,024 tokens take seconds a call in fp32
DECODE_ROWS = 8  # rows of a decoding step (8 prompts sampled per DPKD step)
PARTS = ["kernels", "matmuls", "new_shapes", "casts", "attention", "steps"]


def _medians(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> dict[str, float]:
    times = common.alternate(fns, reps=reps, warmup=warmup)
    return {k: common.median(v) for k, v in times.items()}


def _speedups(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """fp32 milliseconds and fp32 time / each other side's time; `fns` starts with "fp32"."""
    med = _medians(fns, reps)
    return {"fp32_ms": round(med["fp32"] * 1e3, 3),
            **{k: round(med["fp32"] / v, 2) for k, v in med.items() if k != "fp32"}}


# ---- kernels ---------------------------------------------------------------------------------------------------


def _onednn_log(code: str, level: str = "1") -> list[list[str]]:
    """The comma-split lines of oneDNN's log that a child running `code` prints after the line `START`."""
    env = {**os.environ, "ONEDNN_VERBOSE": level, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{common.ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=common.ROOT).stdout
    lines = out.split("START\n", 1)[-1].splitlines()
    return [line.split(",") for line in lines if line.startswith("onednn_verbose")]


def kernels() -> dict:
    code = ("import torch\nx, w = torch.randn(1024, 768), torch.randn(768, 768)\nx @ w\nprint('START', flush=True)\n"
            "x @ w\nprint('onednn_verbose,fp32 done', flush=True)\nx.bfloat16() @ w.bfloat16()\n")
    impl, part = {"fp32": [], "bf16": []}, "fp32"
    for f in _onednn_log(code):
        if f[1] == "fp32 done":
            part = "bf16"
        elif len(f) > 6 and f[3] == "exec":
            impl[part].append(f[6])  # the implementation, e.g. brg_matmul:avx10_1_512_amx
    return {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "amx_tile": torch.cpu._is_amx_tile_supported(), "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
            "fp32 matmul": impl["fp32"] or "not oneDNN (MKL sgemm)", "bf16 matmul": impl["bf16"] or "not oneDNN"}


# ---- matmuls ---------------------------------------------------------------------------------------------------


def _addmm_fns(m: int, k: int, n: int, backward: bool) -> dict[str, Callable[[], object]]:
    """y = b + x @ w in fp32, under autocast and in bf16; backward: of sum(y) into x, w and b (trainable weights),
    else forward only with frozen weights (a teacher, or any model while decoding)."""
    x = torch.randn(m, k).requires_grad_(backward)
    w = (torch.randn(k, n) / k**0.5).requires_grad_(backward)
    b = torch.zeros(n).requires_grad_(backward)
    xb, wb, bb = (t.detach().bfloat16().requires_grad_(backward) for t in (x, w, b))

    def run(x_: torch.Tensor, w_: torch.Tensor, b_: torch.Tensor, cast: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast), torch.set_grad_enabled(backward):
            y = torch.addmm(b_, x_, w_)
        if backward:
            y.float().sum().backward()

    return {"fp32": lambda: run(x, w, b, False), "autocast": lambda: run(x, w, b, True),
            "bf16": lambda: run(xb, wb, bb, False)}


def matmuls(reps: int) -> list[dict]:
    rows = []
    for name, _, w, _, vocab in SIZES:
        for op, (k, n) in {"qkv": (w, 3 * w), "attn out": (w, w), "mlp in": (w, 4 * w), "mlp out": (4 * w, w),
                           "lm head": (w, vocab)}.items():
            m = BIG_TOKENS if op == "lm head" and vocab > 10_000 else TOKENS
            rows.append({"size": name, "op": op, "shape": f"{m}x{k}x{n}",
                         "train": _speedups(_addmm_fns(m, k, n, backward=True), reps),
                         "decode": _speedups(_addmm_fns(DECODE_ROWS, k, n, backward=False), reps * 4)})
    return rows


# ---- new shapes ------------------------------------------------------------------------------------------------


def _matmul_s(a: torch.Tensor, b: torch.Tensor) -> float:
    return common.timed(lambda: a @ b)


def _first_vs_repeat(w: int, rounds: int) -> dict:
    """Forward of a bf16 [M, w] x [w, 4w] matmul at an M seen for the first time vs the same M again."""
    w32 = torch.randn(w, 4 * w)
    wb = w32.bfloat16()
    first, again, fp32 = [], [], []
    for i in range(rounds):
        x = torch.randn(1000 + 7 * i, w)  # a row count no earlier call at this width used
        xb = x.bfloat16()
        first.append(_matmul_s(xb, wb))
        again.append(_matmul_s(xb, wb))
        _matmul_s(x, w32)  # fp32 (MKL) builds nothing per shape: its second call, as bf16's
        fp32.append(_matmul_s(x, w32))
    return {"width": w, "bf16_new_shape_ms": round(common.median(first) * 1e3, 2),
            "bf16_seen_shape_ms": round(common.median(again) * 1e3, 2),
            "fp32_ms": round(common.median(fp32) * 1e3, 2)}


def new_shapes(rounds: int) -> dict:
    code = ("from bench.train_mfu import SFTBench\nb = SFTBench('tiny')\nb.step(b.batch(0), True)\n"
            "b.step(b.batch(0), False)\nprint('START', flush=True)\nb.step(b.batch(1), True)\n")
    count: dict[str, list[float]] = {}
    for f in _onednn_log(code, "all"):
        if len(f) > 4 and f[3] in ("create:cache_miss", "create:cache_hit", "exec"):
            count.setdefault(f[3], []).append(float(f[-1]))
    step = {k: {"calls": len(v), "ms": round(sum(v), 1)} for k, v in count.items()}
    return {"matmul": [_first_vs_repeat(w, rounds) for w in (128, 384, 768)], "sft_step_2x128_onednn": step}


# ---- casts, attention, whole steps -----------------------------------------------------------------------------


def _gpt2(layers: int, width: int, heads: int, vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=1024,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_pytorch_tanh",
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def _cast_row(name: str, layers: int, w: int, heads: int, vocab: int, reps: int) -> dict:
    model = _gpt2(layers, w, heads, vocab)
    weights = [p for p in model.parameters() if p.dim() == 2]  # what autocast casts: the matmuls' operands
    ids = torch.randint(0, vocab, ((BIG_TOKENS if w >= 768 else TOKENS) // 128, 128))
    one = torch.randint(0, vocab, (DECODE_ROWS, 1))

    def cast() -> None:
        for p in weights:
            p.detach().to(torch.bfloat16)

    def fwd_bwd() -> None:
        model(ids).logits.float().sum().backward()

    def decode() -> None:
        with torch.no_grad():
            model(one)

    med = _medians({"cast": cast, "fwd_bwd": fwd_bwd, "decode": decode}, max(3, reps // 2), warmup=1)
    return {"size": name, "cast_ms": round(med["cast"] * 1e3, 2),
            f"fp32_fwd_bwd_{ids.numel()}_tokens_ms": round(med["fwd_bwd"] * 1e3, 1),
            "cast / fwd_bwd": round(med["cast"] / med["fwd_bwd"], 3),
            "fp32_decode_step_ms": round(med["decode"] * 1e3, 2), "cast / decode step": round(med["cast"] /
                                                                                             med["decode"], 2)}


def casts(reps: int) -> list[dict]:
    return [_cast_row(*size, reps) for size in SIZES]


def _attention_row(name: str, w: int, heads: int, reps: int) -> dict:
    # 16 sequences of 140 positions, the last 40 of half of them padding: the padded SFT batch's shape
    q32 = torch.randn(16, heads, 140, w // heads, requires_grad=True)
    q16 = q32.detach().bfloat16().requires_grad_(True)
    mask = torch.ones(16, 1, 140, 140, dtype=torch.bool).tril()
    mask[::2, :, :, 100:] = False

    def run(q: torch.Tensor) -> None:
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask).float().sum().backward()

    return {"size": name, **_speedups({"fp32": lambda: run(q32), "bf16": lambda: run(q16)}, reps)}


def attention(reps: int) -> list[dict]:
    return [_attention_row(name, w, heads, reps) for name, _, w, heads, _ in SIZES]


def _sft_row(size: str, reps: int) -> dict:
    from bench.train_mfu import SFTBench

    bench, k = SFTBench(size), [0]

    def step(bf16: bool) -> None:
        bench.step(bench.batch(k[0] // 2), bf16)  # both precisions see the same batches
        k[0] += 1

    return {"sft step": size, **_speedups({"fp32": lambda: step(False), "autocast": lambda: step(True)}, reps)}


def _sampling_rows(reps: int) -> list[dict]:
    from bench import fixtures
    from prefkd.data.collate import encode_prompts
    from prefkd.data.loaders import load_instructions
    from prefkd.generation import SamplingConfig, sample_responses
    from prefkd.models import load_model, load_tokenizer

    teacher_path, student_path = fixtures.models(fixtures.Fixture())
    tok = load_tokenizer(str(teacher_path))
    records = load_instructions(fixtures.data_dir() / "d_prompts.jsonl", require_references=False)
    prompts = encode_prompts(tok, [r.prompt for r in records[:8]])
    sampling = SamplingConfig(max_new_tokens=160)
    rows = []
    for role, path, frozen in (("teacher 3x192 (frozen)", teacher_path, True),
                               ("student 2x128 (trained)", student_path, False)):
        model = load_model(str(path))
        if frozen:
            model.eval().requires_grad_(False)

        def sample(bf16: bool, model=model) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                sample_responses(model, prompts, sampling, tok.pad_token_id, tok.eos_token_id, seed=0)

        rows.append({"sampling": role, **_speedups({"fp32": lambda s=sample: s(False),
                                                     "autocast": lambda s=sample: s(True)}, reps)})
    return rows


def steps(reps: int) -> list[dict]:
    return [_sft_row(size, reps) for size in ("tiny", "mini", "base")] + _sampling_rows(reps)


# ---- profile ---------------------------------------------------------------------------------------------------

KINDS = [("matmul", re.compile(r"^aten::(mm|addmm|bmm|matmul|linear|baddbmm)$")),
         ("attention", re.compile(r"scaled_dot_product|flash_attention")),
         ("casts", re.compile(r"^aten::(_to_copy|to|copy_)$"))]


def profile(n_steps: int) -> dict:
    """Self CPU seconds by kind of op over `n_steps` DPKD steps of benchmark 6's demo-size run, fp32 and bf16."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from bench import fixtures
    from bench.bf16 import _run

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        _run(Path(tmp) / "warm", False, fixtures.Fixture(), 2)
        for name in ("fp32", "bf16"):
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                wall, _ = _run(Path(tmp) / name, name == "bf16", fixtures.Fixture(), n_steps)
            by_kind: dict[str, float] = {}
            for e in prof.key_averages():
                kind = next((k for k, pat in KINDS if pat.search(e.key)), "other")
                by_kind[kind] = by_kind.get(kind, 0.0) + e.self_cpu_time_total / 1e6
            out[name] = {"steps_wall_s": wall, **{k: round(v, 2) for k, v in sorted(by_kind.items())}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="torch threads, one pass each")
    parser.add_argument("--only", nargs="+", choices=PARTS, help="parts to run (default: all)")
    parser.add_argument("--profile", action="store_true", help="also profile DPKD steps at the demo's sizes")
    args = parser.parse_args()
    reps = 5 if args.quick else 11
    parts = args.only or PARTS
    m = common.machine()
    print(f"cpu: {m['cpu']}, flags {m['cpu_flags']}, {m['cores']} cores, torch {m['torch']}, "
          f"load average {common.load_avg()}")
    if "kernels" in parts:
        print(f"kernels: {kernels()}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n== {threads} thread(s), load average {common.load_avg()}")
        if "matmuls" in parts:
            print("matmuls (addmm): fp32 ms and speed-up of autocast and of bf16 tensors over fp32; "
                  f"train = fwd+bwd, decode = fwd at {DECODE_ROWS} rows")
            for r in matmuls(reps):
                t, d = r["train"], r["decode"]
                print(f"  {r['size']:<6} {r['op']:<8} {r['shape']:>14}  train {t['fp32_ms']:8.2f} ms  autocast "
                      f"{t['autocast']:5.2f}x  bf16 {t['bf16']:5.2f}x | decode {d['fp32_ms']:6.3f} ms  autocast "
                      f"{d['autocast']:5.2f}x  bf16 {d['bf16']:5.2f}x")
        if "new_shapes" in parts:
            res = new_shapes(3 if args.quick else 7)
            print("new shapes: bf16 [M, w] x [w, 4w], an M not seen before vs seen (fp32 for scale)")
            for r in res["matmul"]:
                print(f"  {r}")
            print(f"  oneDNN in one bf16 SFT step, 2x128 model: {res['sft_step_2x128_onednn']}")
        if "casts" in parts:
            print("casts: all 2-d weights to bf16 once, vs fp32 fwd+bwd and vs a decoding step (8 rows, 1 token)")
            for r in casts(reps):
                print(f"  {r}")
        if "attention" in parts:
            print("attention: sdpa fwd+bwd, 16 x 140 positions with a padding mask; fp32 ms, bf16 speed-up")
            for r in attention(reps):
                print(f"  {r}")
        if "steps" in parts:
            print("steps: prefkd's SFT step and sample_responses (8 prompts, <= 160 new tokens); fp32 ms, speed-up")
            for r in steps(reps):
                print(f"  {r}")
    if args.profile:
        torch.set_num_threads(args.threads[0])
        print(f"\nprofile, DPKD steps at the demo's sizes, self CPU s: {profile(10 if args.quick else 20)}")


if __name__ == "__main__":
    main()
