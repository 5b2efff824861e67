"""Time one training stage with an older revision's code and with the working tree's, alternating.

    python -m bench.revision_ab --rev main --config runs/demo/dpkd/seed0/config.yaml --steps 150 --rounds 2

Runs `prefkd distill --config CONFIG train.steps=STEPS` (or `sft` with --verb sft) in fresh processes, alternating
the revision's source (`git archive REV`, on PYTHONPATH) and this tree's, with the same models, data and settings;
prints the training log's elapsed seconds of each run and the ratio of medians. One thread per process
(OMP_NUM_THREADS=1) unless the environment says otherwise. Both revisions must accept the config's keys.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _archive(rev: str, into: Path) -> Path:
    data = subprocess.run(["git", "archive", rev, "src"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", required=True, help="the older revision (git rev)")
    parser.add_argument("--config", required=True, help="a run's config.yaml (its out/cache_dir are replaced)")
    parser.add_argument("--verb", default="distill", choices=["distill", "sft"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = {args.rev: _archive(args.rev, tmp / "old"), "this tree": ROOT / "src"}
        cfg = yaml.safe_load(Path(args.config).read_text())
        cfg.pop("_git_commit", None)
        config = tmp / "config.yaml"
        config.write_text(yaml.safe_dump(cfg))
        elapsed: dict[str, list[float]] = {name: [] for name in sources}
        for r in range(args.rounds):
            for name, src in sources.items():
                out = tmp / f"run-{r}-{len(elapsed[name])}-{'old' if name == args.rev else 'new'}"
                env = {**os.environ, "PYTHONPATH": str(src)}
                env.setdefault("OMP_NUM_THREADS", "1")
                extra = [f"distill.cache_dir={out / 'cache'}"] if args.verb == "distill" else []
                subprocess.run([sys.executable, "-m", "prefkd.cli", args.verb, "--config", str(config), f"out={out}",
                                f"train.steps={args.steps}", *extra], env=env, check=True, capture_output=True)
                last = json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])
                elapsed[name].append(last["elapsed"])
                print(f"{name}: {last['elapsed']:.1f} s for {last['step']} steps", flush=True)
        old, new = (statistics.median(v) for v in elapsed.values())
        print(f"median {old:.1f} s ({args.rev}) vs {new:.1f} s (this tree): {old / new:.2f}x")


if __name__ == "__main__":
    main()
