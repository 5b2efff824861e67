"""Where the time of prefkd's work at GPT-2-small shape goes (torch.profiler, one thread), for benchmarks 11 and 12.

    python -m bench.profile_124m decode [--shape 124m|tiny]   # a decode step of sample_responses at batch 16
    python -m bench.profile_124m gkd [--shape 124m|tiny]      # one on-policy `gkd` step (benchmark 11's)

`decode`: the sampler of benchmark 12 (random-initialised model of the shape, 16 prompts, the end token outside the
vocabulary so every row decodes every step) profiled with N + 1 and with 1 new token; the difference over N is a
decode step, by operator (milliseconds per step, calls per step). `gkd`: one step of benchmark 11's
`PrefkdGKDStep` after one warm-up step, with the sampling and the two models' forwards labelled; the rest of the step
is the divergence, the backward and AdamW. Profiled times are slower than plain ones; the split is what they say.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.autograd.profiler import record_function
from torch.profiler import profile

from bench import common, shapes
from prefkd.generation import SamplingConfig, sample_responses


def _self_ms(prof) -> dict[str, tuple[float, int]]:
    return {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}


def decode(sh: shapes.Shape, rows: int, steps: int = 32) -> None:
    tok = shapes.tokenizer(sh)
    model = shapes.build(sh.student, sh, tok, seed=0).eval()
    prompts = [r["prompt"] for r in shapes.token_data(sh, tok, 16)]

    def sample(n: int) -> None:
        cfg = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n, batch_size=16)
        sample_responses(model, prompts, cfg, tok.pad_token_id, sh.vocab, seed=0)

    sample(steps + 1)
    sample(1)
    ops = {}
    for n in (1, steps + 1):
        with profile() as prof:
            sample(n)
        ops[n] = _self_ms(prof)
    per_step = {k: ((ms - ops[1].get(k, (0, 0))[0]) / steps, (c - ops[1].get(k, (0, 0))[1]) / steps)
                for k, (ms, c) in ops[steps + 1].items()}
    print(f"{sh.name}: a decode step at batch 16, {sum(ms for ms, _ in per_step.values()):.1f} ms profiled")
    for k, (ms, calls) in sorted(per_step.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"  {k:55s} {ms:8.2f} ms  {calls:6.1f} calls")


def gkd(sh: shapes.Shape, rows: int) -> None:
    import prefkd.methods.on_policy as on_policy
    from bench.onpolicy_vs_trl_gkd import PrefkdGKDStep

    tok = shapes.tokenizer(sh)
    student, teacher = shapes.models(sh, tok)
    prompts = [r["prompt"] for r in shapes.token_data(sh, tok, 2 * sh.batch)]
    step = PrefkdGKDStep(student, teacher, tok, prompts, sh, torch.device("cpu"), [])
    step.step(0)
    real = {name: getattr(on_policy, name) for name in ("sample", "divergence_logits")}

    def labelled(name):
        def call(*args, **kwargs):
            with record_function(name):
                return real[name](*args, **kwargs)
        return call

    for name in real:
        setattr(on_policy, name, labelled(name))
    try:
        with profile() as prof:
            t0 = time.perf_counter()
            step.step(1)
            wall = time.perf_counter() - t0
    finally:
        for name, fn in real.items():
            setattr(on_policy, name, fn)
    total = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages()}
    print(f"{sh.name}: one gkd step (lmbda 1, {sh.batch} prompts, {sh.max_new_tokens} new tokens), {wall:.1f} s "
          f"profiled: sampling {total['sample']:.1f} s, the two forwards {total['divergence_logits']:.1f} s, "
          "the rest (divergence, backward, AdamW) after them")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["decode", "gkd"])
    parser.add_argument("--shape", choices=["124m", "tiny"], default="124m")
    parser.add_argument("--rows", type=int, default=15, help="operators listed")
    args = parser.parse_args()
    common.set_threads()
    sh = shapes.SHAPES[args.shape]
    decode(sh, args.rows) if args.what == "decode" else gkd(sh, args.rows)


if __name__ == "__main__":
    main()
