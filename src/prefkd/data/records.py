"""Instruction records: the one in-memory form every loader produces, and prefkd's own jsonl files."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefkd import atomic
from prefkd.data.templates import render_prompt
from prefkd.errors import DataError


@dataclass(frozen=True)
class Instruction:
    instruction: str
    input: str = ""
    references: tuple[str, ...] = field(default_factory=tuple)
    category: str | None = None
    kind: str | None = None  # embedded suite: "D" / "D0" (world facts of that shard) or "skill"
    id: str | None = None

    @property
    def prompt(self) -> str:
        return render_prompt(self.instruction, self.input)

    def to_json(self) -> dict:
        row = asdict(self)
        row["references"] = list(self.references)
        return row


_FIELDS = {"instruction": str, "input": str, "references": list, "category": (str, type(None)),
           "kind": (str, type(None)), "id": (str, type(None))}


def parse_record(row: object, path: str, line: int, require_references: bool) -> Instruction:
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}", path, line)
    unknown = sorted(set(row) - set(_FIELDS))
    if unknown:
        raise DataError(f"unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}", path, line, unknown[0])
    if "instruction" not in row:
        raise DataError("missing required field; every record needs an instruction", path, line, "instruction")
    for name, types in _FIELDS.items():
        if name in row and not isinstance(row[name], types):
            raise DataError(f"wrong type {type(row[name]).__name__}", path, line, name)
    if not row["instruction"].strip():
        raise DataError("empty instruction", path, line, "instruction")
    refs = row.get("references", [])
    if not all(isinstance(r, str) for r in refs):
        raise DataError("references must be a list of strings", path, line, "references")
    if require_references and not any(r.strip() for r in refs):
        raise DataError("this file must have a non-empty reference response for every record", path, line,
                        "references")
    return Instruction(row["instruction"], row.get("input", ""), tuple(refs), row.get("category"),
                       row.get("kind"), row.get("id"))


def write_records(path: str | Path, records: list[Instruction]) -> None:
    atomic.write_jsonl(path, (r.to_json() for r in records))
