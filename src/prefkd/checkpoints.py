"""Resumable training checkpoints: `OUT/checkpoint/step-<N>/`, written so that a kill at any moment leaves the last
complete one readable.

A checkpoint is Accelerate's `save_state` (model as safetensors; optimizer, scheduler and each process's RNG
states through `torch.save`, read back with `weights_only=True`) plus `trainer_state.json` (step, run key, the
open log window, a fingerprint of each process's torch RNG state). It is written into `.step-<N>.tmp`, fsynced and
renamed; only then is the previous one removed. Every process takes part (each saves its own RNG state); the main
process writes the JSON and renames.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from prefkd.errors import PrefkdError
from prefkd.rundir import remove

STATE = "trainer_state.json"


class CheckpointError(PrefkdError):
    """A checkpoint that cannot be read back; the message says what to delete or which flag to pass."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint (renamed into place, with its trainer_state.json), or None."""
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step-*") if p.is_dir() and (p / STATE).exists()]
    return max(done, key=lambda p: p.name) if done else None


def read_state(path: Path) -> dict:
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        int(state["step"]), str(state["run_key"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _unreadable(path, f"{STATE}: {e}") from None
    return state


def rng_fingerprint() -> str:
    return hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]


def save(acc: Accelerator, root: Path, step: int, state: dict) -> Path:
    """Write checkpoint `step` (all processes call this), then drop the older ones."""
    final, tmp = step_dir(root, step), root / f".step-{step:08d}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing this very step
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp), safe_serialization=True)
    rngs = gather_object([rng_fingerprint()]) if acc.num_processes > 1 else [rng_fingerprint()]
    acc.wait_for_everyone()  # every process's files are on disk before the main process seals the directory
    if acc.is_main_process:
        (tmp / STATE).write_text(json.dumps({**state, "step": step, "rng": rngs}), encoding="utf-8")
        _fsync_tree(tmp)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in root.iterdir():  # older checkpoints and leftovers of killed writes
            if old != final and (old.name.startswith("step-") or old.name.endswith(".tmp")):
                remove(old)
    acc.wait_for_everyone()
    return final


def load(acc: Accelerator, path: Path, state: dict) -> None:
    """Restore model, optimizer, scheduler and RNG states from `path`; anything unreadable is a CheckpointError."""
    try:
        acc.load_state(str(path))
    except Exception as e:  # safetensors, weights_only unpickling, missing files, shape mismatches: all mean "bad"
        raise _unreadable(path, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    saved = state.get("rng", [])
    # Accelerate only logs when it cannot restore the RNG states; a silent failure would break bitwise resumption.
    if len(saved) == acc.num_processes and saved[acc.process_index] != rng_fingerprint():
        raise _unreadable(path, f"random_states_{acc.process_index}.pkl did not restore the RNG state")


def _unreadable(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} cannot be read ({why}); pass --overwrite to start the run afresh, "
                           f"or delete {path.parent} and pass --resume to restart it from step 0 keeping its config")


def _fsync_tree(path: Path) -> None:
    """So a checkpoint that is renamed into place also survives a power cut, not just a killed process."""
    for f in path.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
