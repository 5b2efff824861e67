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

`claim()` first takes the directory's lock (`OUT/.prefkd.lock`, an flock held by an open descriptor), so two runs
started at the same moment cannot both pass the check and train into the same directory: the second is refused
with the holder's pid. The lock lasts until `release_all()` (the CLI calls it when a verb ends) or the process ends;
the kernel drops it when the holder dies, even by kill -9, so a killed run's directory needs no cleaning up before
--resume. Under a launcher only the process of rank 0 takes it, for the whole launch.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from prefkd.errors import ConfigError, PrefkdError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks there; claim() then checks without one
    fcntl = None

MODES = ("refuse", "resume", "overwrite", "auto")
LOCK = ".prefkd.lock"  # hidden, and not among the names holds_run() looks for: it never makes a directory "hold a run"
# What a training run writes besides config.yaml; --overwrite removes exactly these (a keyed sample cache under
# OUT/cache is kept: it is only ever reused for the same model, prompts and sampling settings).
OUTPUTS = ("model", "checkpoint", "train_log.jsonl", "train_state.json", "diagnostics.jsonl", "tensorboard")
# Where a model is uploaded is not a training setting: a finished run may be resumed to push it. `_resolved` is
# what an `auto` setting became (recipes/common.py): the setting itself is compared, and a rerun keeps the choice.
IGNORED_KEYS = ("out", "_git_commit", "_resolved")


class RunDirError(PrefkdError):
    """The output directory holds another run (or an unfinished one) and no flag says what to do with it."""


def claim(out: str | Path, settings: dict, mode: str, ignored: list[str] | tuple[str, ...] = ()) -> bool:
    """Check `out` against the run about to start (its resolved config `settings`; the dotted keys `ignored` say
    where results go, not what is computed: trackers, a Hub repo); an error says which flag to pass. Returns whether
    the previous run's outputs must be cleared first (`clear`, on the main process only)."""
    if mode not in MODES:
        raise ConfigError(f"unknown mode '{mode}' for an existing run directory; choose one of {', '.join(MODES)}")
    out = Path(out)
    took = lock(out)
    try:
        return _check(out, settings, mode, (*IGNORED_KEYS, *ignored))
    except BaseException:
        if took:  # refused: the directory is not this process's to hold
            release(out)
        raise


def _check(out: Path, settings: dict, mode: str, ignored: tuple[str, ...]) -> bool:
    if not holds_run(out):
        return False
    previous = read_settings(out)
    diff = (differences(previous, settings, ignored) if previous is not None
            else ["config.yaml is missing or unreadable"])
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


class RunDirBusy(RunDirError):
    """Another live process holds the output directory's lock."""


# resolved out -> (descriptor holding the flock, lock file, the directory claim() created for it or None, owner pid)
_held: dict[Path, tuple[int, Path, Path | None, int]] = {}


def lock(out: Path) -> bool:
    """Take `out`'s lock for this process (creating `out` if needed); True if taken now, False if this process holds
    it already, is not rank 0 of a launch, or the platform has no flock. Refuses with the holder's pid."""
    # Every process of a launch claims the same `out`; rank 0 holds the lock for all of them (the others cannot
    # start training without it: they wait for it at the launch's first barrier). A second launch's rank 0 is refused.
    if fcntl is None or os.environ.get("RANK", "0") != "0":
        return False
    key = out.resolve()
    if key in _held and _held[key][3] == os.getpid():
        return False  # re-entrant: the demo and the tests run several verbs in one process
    created = _make_dirs(out)
    path = out / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # a failed run that had created `out` just removed it again (release)
            out.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunDirBusy(f"{out} is in use by another run (pid {holder}, which holds {path}); wait for it to "
                             f"finish or stop it (a killed run can be continued with --resume), or choose another "
                             f"out=") from None
        except OSError as e:
            os.close(fd)
            raise RunDirError(f"cannot lock {path} ({e.strerror}): the file system does not support file locks; "
                              f"choose an out= on a local disk") from None
        # A holder that ends unlinks the file before closing it: if ours was unlinked between open and flock, we
        # locked a dead inode that the next run would not see. Lock the file that is there now instead.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = (fd, path, created, os.getpid())
    return True


def release(out: Path) -> None:
    """Drop this process's lock on `out` (no-op if it holds none); removes the lock file, and `out` itself when
    claim() created it and nothing was written there: a run refused on bad input leaves nothing behind."""
    entry = _held.pop(Path(out).resolve(), None)
    if entry is None:
        return
    fd, path, created, owner = entry
    if owner != os.getpid():  # a forked child's copy: the lock is its parent's
        return
    path.unlink(missing_ok=True)  # before closing: see the inode check in lock()
    os.close(fd)
    if created is not None:
        for d in (path.parent, *path.parent.parents):
            try:
                d.rmdir()  # only ever an empty directory
            except OSError:
                break
            if d == created:
                break


def release_all() -> None:
    for key in list(_held):
        release(key)


atexit.register(release_all)  # the kernel drops the locks anyway; this removes the files of a clean exit


def _make_dirs(out: Path) -> Path | None:
    """mkdir -p; returns the topmost directory this call created (None if `out` existed)."""
    missing = [d for d in (out, *out.parents) if not d.exists()]
    out.mkdir(parents=True, exist_ok=True)
    return missing[-1] if missing else None


def _holder(fd: int) -> str:
    """The pid the holder wrote; it writes it right after locking, so an empty file is read again a few times."""
    for _ in range(50):
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "unknown"


def holds_run(out: Path) -> bool:
    return out.is_dir() and any((out / name).exists() for name in ("config.yaml", *OUTPUTS))


def read_settings(out: Path) -> dict | None:
    """The resolved config a previous run wrote, or None when it is missing or unreadable."""
    try:
        data = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def differences(old: dict, new: dict, ignored: tuple[str, ...] = IGNORED_KEYS, limit: int = 4) -> list[str]:
    """Up to `limit` dotted keys whose values differ, as `key: old -> new`, leaving out the keys `ignored` (a dotted
    key, or a section and everything under it)."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)
                  and not any(k == i or k.startswith(f"{i}.") for i in ignored))
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
