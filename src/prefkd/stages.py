"""Finished-stage markers: a rerun with the same `--out` reuses a stage whose inputs have not changed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from prefkd import atomic


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def settings(obj: Any) -> Any:
    """`dataclasses.asdict` without the fields marked `metadata={"keyed": False}` (where logs go, such as
    `train.report_to`): a run or stage key is what is computed, so adding a tracker reuses a finished stage."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: settings(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if f.metadata.get("keyed", True)}
    if isinstance(obj, (list, tuple)):
        return type(obj)(settings(v) for v in obj)
    if isinstance(obj, dict):
        return {k: settings(v) for k, v in obj.items()}
    return obj


def unkeyed(obj: Any, prefix: str = "") -> list[str]:
    """The dotted config keys of `obj`'s fields marked `keyed: False` (a whole section when the section is)."""
    out: list[str] = []
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            if not f.metadata.get("keyed", True):
                out.append(f"{prefix}{f.name}")
            else:
                out += unkeyed(getattr(obj, f.name), f"{prefix}{f.name}.")
    return out


def is_done(stage_dir: Path, key: str) -> bool:
    marker = stage_dir / "stage.json"
    return marker.is_file() and json.loads(marker.read_text()).get("key") == key


def mark_done(stage_dir: Path, key: str, info: dict | None = None) -> None:
    atomic.write_json(stage_dir / "stage.json", {"key": key, **(info or {})})


def clear(stage_dir: Path) -> None:
    (stage_dir / "stage.json").unlink(missing_ok=True)
