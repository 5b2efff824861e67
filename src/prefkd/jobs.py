"""The independent stages of `prefkd compare` (control runs, distillation runs, evaluations) as jobs, run one
after another or in parallel worker processes (`workers`).

A job is finished when its stage marker is written (stages.py), so an interrupted parallel run resumes like a
sequential one. Workers are spawned processes with `threads` torch threads each; their console output goes to
OUT/logs/<job>.log, the parent prints one line per job as it finishes. The sample caches of SeqKD-like and PLaD
runs, shared by several runs, are built before the workers start (`prepare`), so no two processes sample them.
DPKD's optional teacher cache (`distill.dpkd.teacher_samples=cached`) fills during training: two runs of one seed
may both append to it; appends are locked, and a row is a valid teacher sample whichever run wrote it.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from prefkd import stages
from prefkd.console import console
from prefkd.data.loaders import load_instructions
from prefkd.methods import get_method
from prefkd.models import load_tokenizer
from prefkd.recipes.distill import DistillRun, run_distill
from prefkd.recipes.evaluate import EvaluateRun, run_evaluate
from prefkd.recipes.sft import SFTRun, run_sft


@dataclass(frozen=True)
class Job:
    name: str  # shown in logs, e.g. "dpkd seed0"
    run: SFTRun | DistillRun | EvaluateRun
    stage_dir: Path
    key: str
    records: str = ""  # SFT references or evaluation records (jsonl); empty for distillation


def pending(jobs: list[Job]) -> list[Job]:
    return [j for j in jobs if not stages.is_done(j.stage_dir, j.key)]


def run_job(job: Job) -> None:
    """Run one stage and mark it done."""
    run, info = job.run, None
    if isinstance(run, SFTRun):
        logs = run_sft(run, load_instructions(job.records), load_tokenizer(run.tokenizer), job.name)
        info = {"final": logs[-1] if logs else {}}
    elif isinstance(run, DistillRun):
        logs = run_distill(run, name=job.name)
        info = {"final": logs[-1] if logs else {}, "method": run.method}
    else:
        run_evaluate(run, load_instructions(job.records), job.name)
    stages.mark_done(job.stage_dir, job.key, info)


def prepare(jobs: list[Job]) -> None:
    """Build the sample caches of the distillation jobs here, one after another, before workers share them.
    Methods that draw no samples before training have none (nothing is loaded for them)."""
    for job in jobs:
        if isinstance(job.run, DistillRun) and get_method(job.run.method).samples_before_training:
            run_distill(job.run, name=job.name, samples_only=True)


def run_jobs(jobs: list[Job], workers: int, log_dir: Path) -> None:
    """Run the unfinished jobs: in this process when workers is 1, else in a pool of spawned processes."""
    todo = pending(jobs)
    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            run_job(job)
        return
    prepare(todo)
    threads = max(1, torch.get_num_threads() // workers)
    log_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"{len(todo)} jobs on {workers} workers x {threads} threads; logs in {log_dir}")
    # spawn, not fork: a forked child would inherit this process's torch thread pool and accelerate state.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_worker, job, threads, str(log_dir / f"{_file_name(job.name)}.log")): job
                   for job in todo}
        t0, left = time.time(), set(futures)
        while left:
            done, left = wait(left, return_when=FIRST_COMPLETED)
            for f in done:
                job = futures[f]
                if f.exception() is not None:
                    for other in left:
                        other.cancel()
                    raise RuntimeError(f"{job.name} failed (log: {log_dir / _file_name(job.name)}.log)") \
                        from f.exception()
                console.print(f"done {job.name} ({len(futures) - len(left)}/{len(futures)}, "
                              f"{time.time() - t0:.0f} s)")


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _worker(job: Job, threads: int, log_path: str) -> None:
    torch.set_num_threads(threads)
    with open(log_path, "a", encoding="utf-8") as log:
        # File descriptors, not just sys.stdout: native code and rich's console write there too.
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        run_job(job)
