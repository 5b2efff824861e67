"""Instruction records: the one in-memory form every loader produces, and prefkd's own jsonl files.

A record is an instruction (plus an optional input) or a conversation. A conversation's `context` holds every turn
before the response: system, user and earlier assistant turns, ending with a user turn; `instruction` is then the
last user turn (what tables and judges show) and `references` the last assistant turn."""

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
    context: tuple[tuple[str, str], ...] = ()  # (role, content) turns before the response; () for an instruction

    @property
    def prompt(self) -> str:
        """The Alpaca rendering; a model with a chat template sees `prefkd.data.chat.Renderer`'s instead."""
        return render_prompt(self.instruction, self.input)

    def messages(self) -> list[dict[str, str]]:
        """The turns before the response as chat messages; an instruction is one user turn (the input after a blank
        line)."""
        if self.context:
            return [{"role": role, "content": content} for role, content in self.context]
        return [{"role": "user", "content": f"{self.instruction}\n\n{self.input}" if self.input else self.instruction}]

    def to_json(self) -> dict:
        row = asdict(self)
        row["references"] = list(self.references)
        if self.context:
            row["context"] = self.messages()
        else:
            del row["context"]
        return row


_FIELDS = {"instruction": str, "input": str, "references": list, "category": (str, type(None)),
           "kind": (str, type(None)), "id": (str, type(None)), "context": list}
ROLES = ("system", "user", "assistant")


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
    context = _context(row.get("context", []), path, line)
    return Instruction(row["instruction"], row.get("input", ""), tuple(refs), row.get("category"),
                       row.get("kind"), row.get("id"), context)


def _context(turns: list, path: str, line: int) -> tuple[tuple[str, str], ...]:
    """prefkd's own `context` field: chat messages ending with a user turn (as `to_json` writes them)."""
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise DataError(f"turn {i} must be {{'role': one of {list(ROLES)}, 'content': str}}", path, line,
                            "context")
        out.append((turn["role"], turn["content"]))
    if out and out[-1][0] != "user":
        raise DataError("the context must end with a user turn (the response answers it)", path, line, "context")
    return tuple(out)


def write_records(path: str | Path, records: list[Instruction]) -> None:
    atomic.write_jsonl(path, (r.to_json() for r in records))
