"""Time `sample_responses` of an older revision against this tree's on benchmark 3's fixtures, alternating.

    python -m bench.sampling_ab --rev 5675ee0 --fixture suite --rounds 3 --reps 5

Each round runs one child process per side (the revision's `src` from `git archive`, or this tree's, on
PYTHONPATH; the fixtures are this tree's, built first). A child samples teacher and student responses for the
fixture's 64 prompts (benchmark 3's settings) once to warm up, then `--reps` times with seeds 0, 1, ...; it reports
the median seconds and a digest of every sample drawn. Prints each child, the ratio of the sides' medians, and
whether both sides drew the same samples, as an exact optimisation must. One torch thread (`BENCH_THREADS`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common, fixtures
from bench.revision_ab import ROOT, _archive

FIXTURES = {"suite": fixtures.Fixture(), "dolly": fixtures.DOLLY}


def _child(fixture: str, reps: int) -> None:
    from bench.pair_generation import MAX_NEW, workload
    from prefkd.generation import SamplingConfig, sample_responses

    common.set_threads()
    teacher, student, prompts, pad, eos = workload(FIXTURES[fixture])
    sampling = SamplingConfig(max_new_tokens=MAX_NEW)
    for m in (teacher, student):
        sample_responses(m, prompts, sampling, pad, eos, seed=0)
    times, samples = [], []
    for r in range(reps):
        t0 = time.perf_counter()
        samples += [sample_responses(m, prompts, sampling, pad, eos, seed=r) for m in (teacher, student)]
        times.append(time.perf_counter() - t0)
    digest = hashlib.sha256(json.dumps(samples).encode()).hexdigest()[:16]
    print(json.dumps({"median_s": statistics.median(times), "digest": digest}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", required=True, help="the older revision (git rev)")
    parser.add_argument("--fixture", default="suite", choices=list(FIXTURES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.fixture, args.reps)
    fixtures.models(FIXTURES[args.fixture])  # built by this tree before anything is timed
    with tempfile.TemporaryDirectory() as tmp:
        sources = {args.rev: _archive(args.rev, Path(tmp)), "this tree": ROOT / "src"}
        runs: dict[str, list[dict]] = {name: [] for name in sources}
        for _ in range(args.rounds):
            for name, src in sources.items():
                env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{ROOT}"}
                out = subprocess.run([sys.executable, "-m", "bench.sampling_ab", "--child", "--rev", args.rev,
                                      "--fixture", args.fixture, "--reps", str(args.reps)],
                                     env=env, check=True, capture_output=True, text=True, cwd=ROOT)
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"{name}: {runs[name][-1]['median_s']:.3f} s per pass", flush=True)
    old, new = (statistics.median(r["median_s"] for r in v) for v in runs.values())
    same = {r["digest"] for v in runs.values() for r in v}
    print(f"{args.fixture}: median {old:.3f} s ({args.rev}) vs {new:.3f} s (this tree): {old / new:.2f}x; "
          f"samples {'identical' if len(same) == 1 else 'DIFFERENT'} on both sides")


if __name__ == "__main__":
    main()
