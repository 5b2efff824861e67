"""Finished-stage markers: a rerun with the same `--out` reuses a stage whose inputs have not changed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefkd import atomic


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_done(stage_dir: Path, key: str) -> bool:
    marker = stage_dir / "stage.json"
    return marker.is_file() and json.loads(marker.read_text()).get("key") == key


def mark_done(stage_dir: Path, key: str, info: dict | None = None) -> None:
    atomic.write_json(stage_dir / "stage.json", {"key": key, **(info or {})})


def clear(stage_dir: Path) -> None:
    (stage_dir / "stage.json").unlink(missing_ok=True)
