"""Where `sample_responses` spends its time on benchmark 3's fixtures (torch.profiler, one torch thread).

    python -m bench.profile_sampling --fixture suite|dolly

Samples teacher and student responses for the fixture's 64 prompts once to warm up, then once under the
profiler, and prints the share of the prefill (`_prefill`, everything before the first decoding step), of
`torch.multinomial` and of sdpa in the profiled time, then the operators with the most time of their own. Shares
are of the profiled run, which the profiler itself slows; they say where the time goes, not how fast it is.
"""

from __future__ import annotations

import argparse

from torch.autograd.profiler import record_function
from torch.profiler import profile

from bench import common, fixtures
from bench.pair_generation import MAX_NEW, workload
from prefkd import generation
from prefkd.generation import SamplingConfig, sample_responses

FIXTURES = {"suite": fixtures.Fixture(), "dolly": fixtures.DOLLY}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", default="suite", choices=list(FIXTURES))
    parser.add_argument("--rows", type=int, default=12, help="operators listed")
    args = parser.parse_args()
    common.set_threads()
    teacher, student, prompts, pad, eos = workload(FIXTURES[args.fixture])
    sampling = SamplingConfig(max_new_tokens=MAX_NEW)
    for m in (teacher, student):
        sample_responses(m, prompts, sampling, pad, eos, seed=0)
    prefill = generation._prefill

    def labelled(*a, **k):
        with record_function("prefill"):
            return prefill(*a, **k)

    generation._prefill = labelled
    try:
        with profile() as prof:
            with record_function("sampling"):
                for m in (teacher, student):
                    sample_responses(m, prompts, sampling, pad, eos, seed=0)
    finally:
        generation._prefill = prefill
    totals = {e.key: e.cpu_time_total for e in prof.key_averages()}
    whole = totals["sampling"]
    for name, key in (("prefill", "prefill"), ("torch.multinomial", "aten::multinomial"),
                      ("sdpa", "aten::scaled_dot_product_attention")):
        print(f"{args.fixture}: {name} {totals.get(key, 0) / whole:.0%} of the sampling time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
