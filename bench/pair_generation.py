"""Benchmark 3: sampling teacher and student responses for 64 prompts, batched vs one `generate` call per prompt.

prefkd's `sample_responses` (length-sorted, left-padded batches with KV cache, cut at EOS) against the naive loop
that calls `model.generate` once per prompt, with the same models, prompts and sampling settings (temperature 1,
top_k 0, top_p 1, up to 128 new tokens). The two alternate; the figure is the ratio of median wall times. What
`sample_responses` did before this work (one `generate` call per batch) is timed alongside, for reference.
`--quick` times Dolly's part on 32 of its 64 prompts, with models SFT-trained 40 steps (`fixtures.QUICK_DOLLY`), and
warms each way up on 8 prompts (`QUICK_DOLLY_PROMPTS`).
"""

from __future__ import annotations

import torch

from bench import common, fixtures
from prefkd.generation import SamplingConfig, left_padded, sample_responses
from prefkd.models import load_model, load_tokenizer
from prefkd.prefix_sharing import shared_prefixes

MAX_NEW = 128
# `--quick`: Dolly's part on the first 32 of its 64 prompts (one batch of `sample_responses`, still balanced over the
# categories: the fixture takes them round-robin), where one `generate` per prompt on Dolly's long answers is most of
# the benchmark's time; and each way warmed up on 8 prompts instead of a whole untimed pass. The suite's part (a few
# seconds a pass) keeps its 64 prompts.
QUICK_DOLLY_PROMPTS = 32
QUICK_WARMUP_PROMPTS = 8


@torch.no_grad()
def naive(model, prompts: list[list[int]], pad: int, eos: int) -> list[list[int]]:
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                             do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=pad, eos_token_id=eos)
        new = gen[0, len(p):].tolist()
        out.append(new[: new.index(eos) + 1] if eos in new else new)
    return out


@torch.no_grad()
def generate_per_batch(model, prompts: list[list[int]], cfg: SamplingConfig, pad: int, eos: int) -> list[list[int]]:
    """What `sample_responses` did before: one `generate` call per length-sorted, left-padded batch (every row runs
    until the batch's longest response ends)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start: start + cfg.batch_size]
        ids, attn = left_padded([prompts[i] for i in idx], pad)
        width = ids.shape[1]
        gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=cfg.max_new_tokens, do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0, pad_token_id=pad, eos_token_id=eos)
        for row, i in enumerate(idx):
            new = gen[row, width:].tolist()
            out[i] = new[: new.index(eos) + 1] if eos in new else new
    return out


def workload(fx: fixtures.Fixture):
    """(teacher, student, the fixture's 64 prompts, pad id, eos id)."""
    t_path, s_path = fixtures.models(fx)
    tokenizer = load_tokenizer(str(s_path))
    teacher, student = load_model(str(t_path)).eval(), load_model(str(s_path)).eval()
    # Both sides get the same prompts, cut from the left so that prompt + MAX_NEW fits the context (as
    # `sample_responses` would cut them; `generate` alone would run past the position table).
    room = min(m.config.n_positions for m in (teacher, student)) - MAX_NEW
    prompts = [e.prompt_ids[-room:] for e in fixtures.pairs(fx)]
    return teacher, student, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id


def shared_template_share(prompts: list[list[int]], batch_size: int) -> list[float]:
    """Per batch of `sample_responses` (prompts sorted by length), the share of prompt tokens that a template shared
    with other prompts of the batch spares the prefill."""
    order = sorted(prompts, key=len, reverse=True)
    shares = []
    for start in range(0, len(order), batch_size):
        batch = order[start: start + batch_size]
        saved = sum(k * (len(members) - 1) for k, members in shared_prefixes(batch))
        shares.append(round(saved / sum(map(len, batch)), 3))
    return shares


def measure(fx: fixtures.Fixture, reps: int, n_prompts: int | None = None, warmup_prompts: int | None = None) -> dict:
    """Median seconds of the three ways on one fixture's 64 prompts (or its first `n_prompts`), teacher then student,
    alternating after a warm-up: one untimed pass of each way, or with `warmup_prompts` a pass on that many prompts."""
    teacher, student, prompts, pad, eos = workload(fx)
    prompts = prompts[:n_prompts] if n_prompts else prompts
    sampling = SamplingConfig(max_new_tokens=MAX_NEW)
    new_tokens: dict[str, list[int]] = {"batched": [], "naive": []}

    def ways(ps: list[list[int]], record: bool) -> dict:
        def batched_pairs():
            for m in (teacher, student):
                n = sum(map(len, sample_responses(m, ps, sampling, pad, eos)))
                if record:
                    new_tokens["batched"].append(n)

        def naive_pairs():
            for m in (teacher, student):
                n = sum(map(len, naive(m, ps, pad, eos)))
                if record:
                    new_tokens["naive"].append(n)

        def previous_pairs():
            for m in (teacher, student):
                generate_per_batch(m, ps, sampling, pad, eos)

        return {"batched": batched_pairs, "naive": naive_pairs, "previous": previous_pairs}

    load_before = common.load_avg()
    if warmup_prompts:
        common.alternate(ways(prompts[:warmup_prompts], record=False), reps=0, warmup=1)
    times = common.alternate(ways(prompts, record=True), reps=reps, warmup=0 if warmup_prompts else 1)
    med = {k: common.median(v) for k, v in times.items()}
    return {"ratio": round(med["naive"] / med["batched"], 2),
            "prompts": len(prompts),
            "median_s": {k: round(v, 2) for k, v in med.items()},
            "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
            "prefill_tokens_saved_by_shared_templates": shared_template_share(prompts, sampling.batch_size),
            "mean_new_tokens_per_pass": {k: round(sum(v) / (len(v) / 2)) for k, v in new_tokens.items()},
            "previous_implementation_vs_batched": round(med["previous"] / med["batched"], 2),
            "batch_size": sampling.batch_size, "load_avg_start": load_before, "load_avg_end": common.load_avg()}


def run(quick: bool) -> dict:
    reps = 2 if quick else 4
    warm = QUICK_WARMUP_PROMPTS if quick else None
    suite = measure(fixtures.Fixture(), reps, warmup_prompts=warm)
    dolly_fx = fixtures.QUICK_DOLLY if quick else fixtures.DOLLY
    dolly = measure(dolly_fx, reps, QUICK_DOLLY_PROMPTS if quick else None, warm)
    figures = {"pair_generation_vs_naive": suite.pop("ratio"), "pair_generation_vs_naive_dolly": dolly.pop("ratio")}
    settings = {"prompts": suite["prompts"], "prompts_dolly": dolly["prompts"],
                "warmup": f"a pass of each way on {warm} prompts" if warm else "a whole pass of each way",
                "models": "teacher gpt2 mini + student gpt2 tiny", "max_new_tokens": MAX_NEW,
                "temperature": 1.0, "top_k": 0, "reps": reps, "threads": torch.get_num_threads(),
                "fixtures": {"suite": f"the demo's suite, models SFT {fixtures.Fixture().teacher_steps} steps",
                             "dolly": f"Dolly prompts (D shard of 2,000 filtered training records), models SFT "
                                      f"{dolly_fx.teacher_steps} steps on Dolly"}}
    common.save("pair_generation", figures, settings, {"suite": suite, "dolly": dolly})
    rows = []
    for name, d in (("suite", suite), ("dolly", dolly)):
        key = "pair_generation_vs_naive" + ("_dolly" if name == "dolly" else "")
        rows += [(f"{name}: median time naive / batched", f"{figures[key]}x", ">= 3x"),
                 (f"{name}: seconds batched, naive; new tokens per pass; prompt tokens",
                  f"{d['median_s']['batched']}, {d['median_s']['naive']}; {d['mean_new_tokens_per_pass']['batched']}"
                  f"; {d['mean_prompt_tokens']}", ""),
                 (f"{name}: before this work (one generate per batch) / batched",
                  f"{d['previous_implementation_vs_batched']}x", "report")]
    common.table(f"3. Teacher + student samples for {suite['prompts']} prompts (Dolly: {dolly['prompts']}): batched vs "
                 "one generate per prompt", rows)
    return figures
