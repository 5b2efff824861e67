"""Benchmark 13: peak memory of a fresh-sample DPKD step by component at GPT-2 small and medium shapes (124M, 355M),
measured on this machine, beside `configs/accelerate/memory_plan.py`'s estimate of the same components.

One child process per shape (`bench/shapes.py`: student and teacher of the same shape, random-initialised, fp32,
`shape.batch` prompts per step, `max_new_tokens` new tokens: random models sample all of them) runs the parts of
`methods.dpkd.sampled_pairs` (Algorithm 1) one after another, as benchmark 11's breakdown does, and reads its
memory around each (glibc's freed memory is given back first, `malloc_trim`, so RSS is what is live):
- teacher: RSS added by building the teacher;
- student states: RSS added by building the student (weights), the AdamW moments that stay after the first
  optimizer step, and the gradients (live from the backward to `zero_grad`);
- sampling: the peak above RSS while the teacher samples, and while the student samples (the KV cache, which
  prefkd's sampler preallocates for prompt + `max_new_tokens`, and the logits of the step);
- activations: what the student's forward keeps for the backward (RSS after the forward), the peak of forward +
  backward above the states, and the teacher's scoring forward (no gradients);
- the optimizer step's peak.
The step measured is the second (the first allocates the AdamW moments). The estimate is memory_plan's as written
(bf16 teacher, 16-bit activations and cache: its GPU layout) and the same formulas at fp32 (4 bytes a value), for a
step of `batch` prompts whose sequences are all max_length = longest prompt + max_new_tokens. `--shape tiny`
runs the same at the tiny shape.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time

import torch

from bench import common, shapes
from prefkd.data.collate import Example
from prefkd.generation import SamplingConfig
from prefkd.methods import MethodConfig, StepInputs
from prefkd.methods.base import sample, sample_teacher
from prefkd.methods.dpkd import dpkd_pair_loss, pair_step, teacher_logps
from prefkd.train import adamw

MB = 2**20


def memory_plan():
    spec = importlib.util.spec_from_file_location("memory_plan", common.ROOT / "configs/accelerate/memory_plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_plan"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def estimate(sh: shapes.Shape, max_length: int, value_bytes: int) -> dict[str, float]:
    """memory_plan's components of one DPKD step on one device (its 'one GPU, no launch' row), in bytes;
    `value_bytes` 2 is memory_plan as written (bf16 teacher weights, 16-bit activations and cache)."""
    mp = memory_plan()
    arch = {name: mp.Arch(f"GPT-2 {name} shape", a.layers, a.width, 4 * a.width, sh.vocab, sh.positions)
            for name, a in (("student", sh.student), ("teacher", sh.teacher))}
    s, t, b = arch["student"], arch["teacher"], sh.batch
    return {"teacher_weights": t.params * value_bytes, "student_states": s.params * 16,
            "activations": mp.activations(s, 2 * b, max_length, value_bytes)
            + mp.activations(t, 2 * b, max_length, value_bytes) / t.layers,
            "sampling_kv_cache": max(mp.kv_cache(t, b, max_length, value_bytes),
                                     mp.kv_cache(s, b, max_length, value_bytes)),
            "params_counted": {"student": s.params, "teacher": t.params}}


def child(shape: str) -> None:
    """The measurement of one shape in this process; prints its components (kB) as the last JSON line."""
    common.set_threads()
    sh = shapes.SHAPES[shape]
    dev = torch.device("cpu")
    tok = shapes.tokenizer(sh)
    prompts = [r["prompt"] for r in shapes.token_data(sh, tok, 2 * sh.batch)]
    out: dict = {}

    def rss() -> int:
        shapes.trim()
        return common.rss_kb()

    _warm_up()
    r0 = rss()
    teacher = shapes.build(sh.teacher, sh, tok, seed=1).eval().requires_grad_(False)
    r1 = rss()
    student = shapes.build(sh.student, sh, tok, seed=0)
    opt = adamw(student.parameters(), lr=5e-5)
    r2 = rss()
    out.update(teacher_weights=r1 - r0, student_weights=r2 - r1,
               params={"student": shapes.params(student), "teacher": shapes.params(teacher)})
    cfg = MethodConfig(kappa=1.0, replay=0.0)
    sampling = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=sh.max_new_tokens,
                              batch_size=sh.batch)

    def peak_of(fn) -> tuple[object, int, int]:
        """(fn's result, its peak RSS above the RSS before it, RSS after it minus before), kB."""
        shapes.trim()
        base = common.reset_peak()
        result = fn()
        return result, common.rss_kb("VmHWM") - base, common.rss_kb() - base

    for k in range(2):
        examples = [Example(p, []) for p in prompts[k * sh.batch: (k + 1) * sh.batch]]
        inp = StepInputs(student, student, teacher, examples, sampling, cfg, tok.pad_token_id, tok.eos_token_id, dev)
        y_t, t_peak, _ = peak_of(lambda inp=inp, ex=examples: sample_teacher(ex, inp))
        y_s, s_peak, _ = peak_of(lambda inp=inp, ex=examples: sample(inp.student_sampler, ex, inp))
        (p_t, p_s), tf_peak, _ = peak_of(lambda ex=examples, y_t=y_t, y_s=y_s: teacher_logps(
            teacher, [e.prompt_ids for e in ex], y_t, [y_s], [None] * len(y_t), dev))
        before_fwd = rss()
        base = common.reset_peak()  # the forward keeps its activations for the backward: RSS after it says how much
        loss = pair_step(inp, y_t, [y_s], dpkd_pair_loss, p_t, p_s).loss
        held = common.rss_kb() - base
        loss.backward()
        fb_peak = common.rss_kb("VmHWM") - base
        del loss
        grads = rss() - before_fwd
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        _, opt_peak, _ = peak_of(opt.step)
        opt.zero_grad(set_to_none=True)
        after = rss()
        if k == 0:
            moments = after - r2
            continue
        out.update(adamw_moments=moments, gradients=grads, teacher_sampling_peak=t_peak, student_sampling_peak=s_peak,
                   teacher_forward_peak=tf_peak, student_forward_held=held, forward_backward_peak=fb_peak,
                   optimizer_step_peak=opt_peak, step_rss_after=after - r0,
                   tokens={"prompt": sum(len(e.prompt_ids) for e in examples), "y_t": sum(map(len, y_t)),
                           "y_s": sum(map(len, y_s))},
                   max_length=max(len(e.prompt_ids) for e in examples) + sh.max_new_tokens)
    out["process_peak_kb"] = common.rss_kb("VmHWM")
    print(json.dumps(out), flush=True)


def _warm_up() -> None:
    """One step of every part on tiny models first, so that the code pages and allocator arenas each part touches
    the first time are in the RSS before the measurement starts, not in the first component that uses them. (The
    tiny shape's own tokenizer: a larger shape's token ids are outside the tiny models' vocabulary.)"""
    sh = shapes.SHAPES["tiny"]
    tok = shapes.tokenizer(sh)
    student, teacher = shapes.models(sh, tok)
    opt = adamw(student.parameters(), lr=5e-5)
    examples = [Example(r["prompt"], []) for r in shapes.token_data(sh, tok, sh.batch)]
    inp = StepInputs(student, student, teacher, examples, SamplingConfig(max_new_tokens=sh.max_new_tokens),
                     MethodConfig(kappa=1.0, replay=0.0), tok.pad_token_id, tok.eos_token_id, torch.device("cpu"))
    y_t, y_s = sample_teacher(examples, inp), sample(student, examples, inp)
    p_t, p_s = teacher_logps(teacher, [e.prompt_ids for e in examples], y_t, [y_s], [None] * len(y_t), inp.device)
    pair_step(inp, y_t, [y_s], dpkd_pair_loss, p_t, p_s).loss.backward()
    opt.step()


def measured_components(m: dict) -> dict[str, float]:
    """The measurement (kB) in memory_plan's components, bytes."""
    kb = 1024
    return {"teacher_weights": m["teacher_weights"] * kb,
            "student_states": (m["student_weights"] + m["adamw_moments"] + m["gradients"]) * kb,
            "activations": max(m["forward_backward_peak"] - m["gradients"], m["teacher_forward_peak"]) * kb,
            "sampling_kv_cache": max(m["teacher_sampling_peak"], m["student_sampling_peak"]) * kb}


def run(quick: bool, shape: str | None = None) -> dict:
    names = ["tiny"] if shapes.shape_for(shape, quick).name == "tiny" else ["124m", "355m"]
    load_before = common.load_avg()
    results, figures, rows = {}, {}, []
    for name in names:
        t0 = time.time()
        m = common.run_children({name: ["-m", "bench.memory_at_scale", "--child", name]}, 1, timeout=3600)[name][0]
        sh = shapes.SHAPES[name]
        measured = measured_components(m)
        est16, est32 = estimate(sh, m["max_length"], 2), estimate(sh, m["max_length"], 4)
        comps = ("teacher_weights", "student_states", "activations", "sampling_kv_cache")
        results[name] = {"measured_kb": m, "seconds": round(time.time() - t0),
                         "components_mb": {c: {"memory_plan_16bit": round(est16[c] / MB, 1),
                                               "memory_plan_fp32": round(est32[c] / MB, 1),
                                               "measured": round(measured[c] / MB, 1)} for c in comps},
                         "memory_plan_params": est16["params_counted"]}
        key = f"memory_dpkd_step_measured_vs_plan_fp32_{name}"
        total_measured = sum(measured[c] for c in comps)
        total_plan = sum(est32[c] for c in comps)
        figures[key] = round(total_measured / total_plan, 3)
        for c in comps:
            v = results[name]["components_mb"][c]
            rows.append((f"{name}: {c.replace('_', ' ')} MB", f"{v['measured']}",
                         f"plan {v['memory_plan_fp32']} at fp32, {v['memory_plan_16bit']} at 16 bit"))
        rows.append((f"{name}: process peak RSS MB; sum of components measured / plan at fp32",
                     f"{round(m['process_peak_kb'] / 1024, 1)}; {figures[key]}x", "report"))
    settings = {"shapes": {n: shapes.SHAPES[n].describe() for n in names}, "device": "cpu", "precision": "fp32",
                "weights": "random init", "method": "dpkd, teacher_samples=fresh, kappa=1, K=1",
                "threads": torch.get_num_threads(),
                "plan": "configs/accelerate/memory_plan.py, one device: teacher P_t x bytes, student 16 P_s, "
                        "activations(student, 2B, max_length) + activations(teacher, 2B, max_length) / layers, "
                        "KV max(teacher, student) for B sequences of max_length"}
    common.save("memory_at_scale", figures, settings, {**results, "load_avg_start": load_before,
                                                        "load_avg_end": common.load_avg()})
    common.table("13. Peak memory of a fresh-sample DPKD step by component (CPU, fp32) vs memory_plan.py", rows)
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=list(shapes.SHAPES), required=True)
    child(parser.parse_args().child)
