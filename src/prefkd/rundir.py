"""The run directory: one run per `out`, and every path the tool writes stays inside the directory it belongs to.

A training run's directory holds `config.yaml` (its resolved settings), `train_log.jsonl`, `checkpoint/` while it
runs, and `model/` plus `train_state.json` once it finished. `claim()` decides what a new run does with a
directory that already holds one:

  refuse     the CLI's default: anything there is an error that says which flag to pass
  resume     (--resume) continue a run of the same settings; a finished one is kept as it is
  overwrite  (--overwrite) discard what the previous run wrote and start afresh
  auto       the programmatic default (the demo's stages): resume the same settings, discard other settings

"Same settings" means the same resolved config (`out` and the code version aside). The data and models it names
are checked later, by the training loop's run key (`train.py`): a checkpoint of other data is never resumed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import yaml

from prefkd.errors import ConfigError, PrefkdError

MODES = ("refuse", "resume", "overwrite", "auto")
# What a training run writes besides config.yaml; --overwrite removes exactly these (a keyed sample cache under
# OUT/cache is kept: it is only ever reused for the same model, prompts and sampling settings).
OUTPUTS = ("model", "checkpoint", "train_log.jsonl", "train_state.json", "diagnostics.jsonl", "tensorboard")
IGNORED_KEYS = ("out", "_git_commit")


class RunDirError(PrefkdError):
    """The output directory holds another run (or an unfinished one) and no flag says what to do with it."""


def claim(out: str | Path, settings: dict, mode: str) -> bool:
    """Check `out` against the run about to start (its resolved config `settings`); an error says which flag to
    pass. Returns whether the previous run's outputs must be cleared first (`clear`, on the main process only)."""
    if mode not in MODES:
        raise ConfigError(f"unknown mode '{mode}' for an existing run directory; choose one of {', '.join(MODES)}")
    out = Path(out)
    if not holds_run(out):
        return False
    previous = read_settings(out)
    diff = differences(previous, settings) if previous is not None else ["config.yaml is missing or unreadable"]
    if mode == "overwrite" or (mode == "auto" and diff):
        return True
    if mode == "auto" or (mode == "resume" and not diff):
        return False
    state = describe_state(out)
    if diff:
        hint = "pass --overwrite to discard it, or choose another out=" if mode == "refuse" else \
            "--resume continues a run of the same settings only; pass --overwrite to discard it, or choose another out="
        raise RunDirError(f"{out} holds {state} of other settings ({'; '.join(diff)}); {hint}")
    todo = "keep it (nothing is retrained)" if state == "a finished run" else "continue it from its last checkpoint"
    raise RunDirError(f"{out} holds {state} of these settings; pass --resume to {todo}, or --overwrite to discard "
                      f"it and start afresh")


def holds_run(out: Path) -> bool:
    return out.is_dir() and any((out / name).exists() for name in ("config.yaml", *OUTPUTS))


def read_settings(out: Path) -> dict | None:
    """The resolved config a previous run wrote, or None when it is missing or unreadable."""
    try:
        data = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def differences(old: dict, new: dict, limit: int = 4) -> list[str]:
    """Up to `limit` dotted keys whose values differ, as `key: old -> new`."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(k for k in set(a) | set(b) if k.split(".")[0] not in IGNORED_KEYS and a.get(k) != b.get(k))
    shown = [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in keys[:limit]]
    return shown + ([f"{len(keys) - limit} more"] if len(keys) > limit else [])


def describe_state(out: Path) -> str:
    """'a finished run', 'an interrupted run (last checkpoint: step N)' or 'an interrupted run (no checkpoint yet)'."""
    try:
        if json.loads((out / "train_state.json").read_text(encoding="utf-8")).get("finished"):
            return "a finished run"
    except (OSError, ValueError):
        pass
    steps = sorted((out / "checkpoint").glob("step-*")) if (out / "checkpoint").is_dir() else []
    if steps:
        return f"an interrupted run (last checkpoint: step {int(steps[-1].name.split('-')[1])})"
    return "an interrupted run (no checkpoint yet)"


def clear(out: Path) -> None:
    """Remove what a previous run wrote (config.yaml is rewritten by the new run); a kill halfway leaves nothing
    half-deleted under its real name."""
    for name in OUTPUTS:
        remove(out / name)


def remove(path: Path) -> None:
    """Delete a file or tree by renaming it to a hidden name first, so nothing half-deleted is ever read."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink():
        doomed = path.with_name(f".{path.name}.deleting-{uuid.uuid4().hex[:8]}")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        path.unlink()


def inside(root: str | Path, value: str, key: str) -> Path:
    """`value` (a path from a config) for writing: relative paths are taken under `root` and may not climb out
    of it with `..`; an absolute path is the user's explicit choice and used as given."""
    if not value:
        raise ConfigError(f"config key '{key}' is empty")
    path = Path(value)
    if path.is_absolute():
        return path
    # Lexical check: `root/a/../b` is fine, `root/../x` is not. A symlink under root is the user's own doing.
    normal = Path(os.path.normpath(path))
    if normal.parts and normal.parts[0] == "..":
        raise ConfigError(f"config key '{key}': '{value}' would write outside {root}; relative paths are taken "
                          f"inside it, so give a path without '..' or an absolute path")
    return Path(root) / normal


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
