"""Run the benchmarks: `python -m bench.run [--quick] [--only NAME ...]`; figures go to bench/results.json.

`make bench` runs them all with more repetitions; `make bench-quick` with fewer (under 10 minutes here).
"""

from __future__ import annotations

import argparse
import importlib
import time

from bench import common

BENCHMARKS = {  # name -> module; the order of the issue
    "dpkd_vs_trl": "bench.dpkd_vs_trl",
    "logprob_memory": "bench.logprob_memory",
    "pair_generation": "bench.pair_generation",
    "teacher_cache": "bench.teacher_cache",
    "train_mfu": "bench.train_mfu",
    "bf16": "bench.bf16",
    "cross_tokenizer": "bench.cross_tokenizer",
    "canonical_mass": "bench.canonical_mass",
    "teacher_logits": "bench.teacher_logits",
    "train_prefix_sharing": "bench.train_prefix_sharing",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    args = parser.parse_args()
    threads = common.set_threads()
    common.console.print(f"[bold]prefkd benchmarks[/] ({'quick' if args.quick else 'full'}), torch threads "
                         f"{threads}, load average {common.load_avg()}")
    t0 = time.time()
    for name in args.only or BENCHMARKS:
        t = time.time()
        importlib.import_module(BENCHMARKS[name]).run(args.quick)
        common.console.print(f"{name}: {time.time() - t:.0f} s")
    common.console.print(f"all done in {time.time() - t0:.0f} s; figures in {common.RESULTS}")


if __name__ == "__main__":
    main()
