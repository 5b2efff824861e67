"""Run the benchmarks: `python -m bench.run [--quick] [--only NAME ...] [--shape tiny|124m] [--device cpu|cuda]`;
figures go to bench/results.json.

`make bench` runs them all with more repetitions; `make bench-quick` with fewer, and the benchmarks of the 124M
shape (bench/shapes.py) at the tiny shape, so that it stays under 12 minutes. `--shape` and `--device` go to the
benchmarks that take them (those of bench/shapes.py); the others run as always.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
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
    "dpkd_vs_trl_124m": "bench.dpkd_vs_trl_124m",
    "onpolicy_vs_trl_gkd": "bench.onpolicy_vs_trl_gkd",
    "sampling_roofline": "bench.sampling_roofline",
    "memory_at_scale": "bench.memory_at_scale",
    "train_prefix_sharing": "bench.train_prefix_sharing",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    parser.add_argument("--shape", choices=["tiny", "124m"],
                        help="shape of the 124M-shape benchmarks (default: 124m, tiny with --quick)")
    parser.add_argument("--device", help="device of the 124M-shape benchmarks (default cpu, or BENCH_DEVICE)")
    args = parser.parse_args()
    threads = common.set_threads()
    common.console.print(f"[bold]prefkd benchmarks[/] ({'quick' if args.quick else 'full'}), torch threads "
                         f"{threads}, load average {common.load_avg()}")
    t0 = time.time()
    for name in args.only or BENCHMARKS:
        t = time.time()
        fn = importlib.import_module(BENCHMARKS[name]).run
        takes = inspect.signature(fn).parameters
        fn(args.quick, **{k: v for k, v in (("shape", args.shape), ("device", args.device)) if k in takes})
        common.console.print(f"{name}: {time.time() - t:.0f} s")
    common.console.print(f"all done in {time.time() - t0:.0f} s; figures in {common.RESULTS}")


if __name__ == "__main__":
    main()
