"""Load instruction data (Dolly, MiniLLM, prefkd, or any schema through a field map) and conversations (TRL
messages and prompt-completion, ShareGPT) into `Instruction` records.

Local .jsonl/.json/.csv/.parquet files, and directories of them, are read here so that every error can name the
file, the line (the row for parquet, the item for a .json list) and the field; a directory saved with
`datasets.save_to_disk` is read with `load_from_disk`; any other source that is not an existing path is taken as a
Hugging Face dataset id. Every bad record is a `DataError`; with `skip_bad=True` bad records are skipped and counted
by reason instead (whole-file problems, such as an empty file, always raise).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from prefkd.data import conversations as conv
from prefkd.data.records import Instruction, parse_record
from prefkd.errors import ConfigError, DataError

CONVERSATIONAL = ("messages", "prompt-completion", "sharegpt")
FORMATS = ("auto", "dolly", "minillm", "prefkd", *CONVERSATIONAL)
# Our field name -> the file's field name, per format. `prompt` is only checked, never loaded.
_MAPPINGS: dict[str, dict[str, str]] = {
    "dolly": {"instruction": "instruction", "input": "context", "references": "response", "category": "category",
              "id": "id"},
    "minillm": {"instruction": "instruction", "input": "input", "references": "output", "category": "topic",
                "id": "id", "prompt": "prompt"},
    "custom": {"instruction": "instruction", "input": "input", "references": "references", "category": "category",
               "kind": "kind", "id": "id"},
}
_MAPPABLE = ("instruction", "input", "references", "category", "kind", "id")
# Suffixes that mark a source as a local file, so a typo in a path never turns into a hub request.
_FILE_SUFFIXES = {".json", ".jsonl", ".csv", ".parquet", ".tsv", ".txt", ".gz", ".zst", ".arrow"}
_FIX = "fix or remove the record, or pass skip_bad=True to skip bad records"


class _BadRecord(DataError):
    """A DataError for one record, tagged with a reason so skip_bad can count it."""

    def __init__(self, reason: str, message: str, path: str, line: int, field: str | None = None):
        super().__init__(f"{message}; {_FIX}", path, line, field)
        self.reason = reason


Row = tuple[int, object]  # (1-based line or row number, parsed row or the _BadRecord that reading it raised)


class _Part(NamedTuple):
    """The rows of one file (or hub split): a directory is several, each detected and named on its own."""

    where: str  # what errors name: the file's path, or `id[split]`
    name: str  # what ids name: `name:LINE`
    rows: list[Row]
    flat: bool = False  # csv: every cell is a string, so a list of references can only be one string


def load_instructions(source: str | Path, format: str = "auto", skip_bad: bool = False, split: str = "train",
                      require_references: bool = True, **field_map: str) -> list[Instruction]:
    """Records from `source`; see `load_instructions_with_report` for the arguments."""
    records, _ = load_instructions_with_report(source, format, skip_bad, split, require_references, **field_map)
    return records


def load_instructions_with_report(source: str | Path, format: str = "auto", skip_bad: bool = False,
                                  split: str = "train", require_references: bool = True, **field_map: str
                                  ) -> tuple[list[Instruction], dict[str, int]]:
    """Records plus counts: `loaded`, `skipped`, and one key per skip reason (e.g. `malformed_json`).

    `format`: "dolly", "minillm", "prefkd", "messages", "prompt-completion", "sharegpt" or "auto" (decided by
    each file's first record's keys). `field_map` maps our names (instruction, input, references, category, kind,
    id) to the file's, e.g. `instruction="question"`; it applies to instruction formats only. `split` is used only
    for Hugging Face dataset ids and saved datasets. `require_references=False` accepts prompts without a response
    (their `references` are empty), e.g. a distillation set.
    """
    source = str(source)
    if format not in FORMATS:
        raise ConfigError(f"unknown format '{format}'; use one of {list(FORMATS)}")
    bad_keys = sorted(set(field_map) - set(_MAPPABLE))
    if bad_keys:
        raise ConfigError(f"unknown field_map key(s) {bad_keys}; map any of {list(_MAPPABLE)} to your field names")
    if field_map and format in CONVERSATIONAL:
        raise ConfigError(f"field_map maps instruction fields; format '{format}' has fixed fields: drop the map")
    records: list[Instruction] = []
    skipped: Counter[str] = Counter()
    parts, where = _read_source(source, split)
    for part in parts:
        got, bad = _load_part(part, format, field_map, require_references, skip_bad)
        records += got
        skipped += bad
    if not records:
        raise DataError(f"every record was bad ({dict(skipped)}); check the format and field names", where)
    return records, {"loaded": len(records), "skipped": sum(skipped.values()), **skipped}


def _load_part(part: _Part, format: str, field_map: dict[str, str], require_references: bool, skip_bad: bool
               ) -> tuple[list[Instruction], Counter[str]]:
    """The part's records, and its skipped ones counted by reason."""
    if not part.rows:
        raise DataError("no records; the file is empty — pass a file with at least one record", part.where)
    fmt = _detect(part.rows, part.where, bool(field_map)) if format == "auto" else format
    records: list[Instruction] = []
    skipped: Counter[str] = Counter()
    for line, row in part.rows:
        try:
            if isinstance(row, _BadRecord):
                raise row
            if part.flat and fmt == "prefkd" and not field_map and isinstance(row, dict):
                row = _flat_prefkd_row(row)
            rec = _convert(row, fmt, field_map, part.where, line, require_references)
        except _BadRecord as e:
            if not skip_bad:
                raise
            skipped[e.reason] += 1
            continue
        # Every record gets an id so generations and scores can be traced back to their line.
        records.append(rec if rec.id else dataclasses.replace(rec, id=f"{part.name}:{line}"))
    return records, skipped


def _flat_prefkd_row(row: dict) -> dict:
    """A csv row in prefkd's schema: empty cells are absent fields, and the `references` cell is one reference
    (a csv cell cannot hold a list; the Dolly and MiniLLM schemas read their response cell the same way)."""
    out = {k: v for k, v in row.items() if v != "" or k == "instruction"}
    if isinstance(out.get("references"), str):
        out["references"] = [out["references"]]
    return out


# --- reading --------------------------------------------------------------------------------------------------


_SPLIT_SUFFIX = re.compile(r"(.+)\[([\w.-]+)\]")


def _read_source(source: str, split: str) -> tuple[list[_Part], str]:
    """The parts of `source` and what errors about the whole source name."""
    path = Path(source).expanduser()
    if path.is_file():
        return [_read_file(path)], str(path)
    if path.is_dir():
        return _read_dir(path, split), str(path)
    looks_local = path.suffix.lower() in _FILE_SUFFIXES or source.startswith(("/", "./", "../", "~"))
    if looks_local:
        raise DataError("file not found; pass an existing .jsonl/.json/.csv/.parquet file or a directory of them "
                        "(a source without a file suffix is looked up as a Hugging Face dataset id)", source)
    named = _SPLIT_SUFFIX.fullmatch(source)  # `id[split]`, as errors name a hub split: a split from the command line
    if named:
        source, split = named.group(1), named.group(2)
    where = f"{source}[{split}]"
    return [_Part(where, Path(source).name, _read_hub(source, split))], where


def _read_file(path: Path) -> _Part:
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"unsupported file type '{path.suffix}'; use one of {sorted(_READERS)}", str(path))
    return _Part(str(path), path.name, reader(path), flat=reader is _read_csv)


def _read_dir(path: Path, split: str) -> list[_Part]:
    """Every data file directly in `path`, sorted by name (subdirectories are not read: a directory is one
    dataset, and a tree may hold other splits or unrelated files); or a dataset saved with `save_to_disk`."""
    if (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file()
                                                  and (path / "dataset_info.json").is_file()):
        return [_read_saved(path, split)]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _READERS
                   and not p.name.startswith("."))
    if not files:
        raise DataError("no .jsonl/.json/.csv/.parquet file in this directory (subdirectories are not read); pass "
                        "a data file, a directory holding some, or a Hugging Face dataset id", str(path))
    _check_one_split(files, path)
    return [_read_file(f) for f in files]


# Words that mark a file as one split of a dataset; train.jsonl next to test.jsonl must not load as one dataset.
_SPLIT_WORDS = {"train": "train", "training": "train", "test": "test", "testing": "test", "eval": "test",
                "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation"}


def _check_one_split(files: list[Path], path: Path) -> None:
    """Refuses a directory whose file names name several splits: loaded as one dataset, the evaluation records
    would train the model. (`datasets.load_dataset` would pick files by split name; here a directory is one
    dataset, so choosing a split is left to the user, by passing its file.)"""
    first: dict[str, str] = {}
    for f in files:
        for word in re.split(r"[^a-z0-9]+", f.stem.lower()):
            if word in _SPLIT_WORDS:
                first.setdefault(_SPLIT_WORDS[word], f.name)
    if len(first) > 1:
        names = ", ".join(f"{name} ({split})" for split, name in first.items())
        example = path / first.get("train", next(iter(first.values())))
        raise DataError(f"the files name several splits ({names}); loaded together the held-out records would mix "
                        f"into training: pass one file, e.g. {example}", str(path))


def _read_saved(path: Path, split: str) -> _Part:
    import datasets  # heavy import, needed only for hub ids and saved datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # damaged or incompatible saved datasets raise several types
        raise DataError(f"cannot load the saved dataset ({type(e).__name__}: {e}); check the directory",
                        str(path)) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"no split '{split}' in this saved dataset; pass split= one of {sorted(ds)}", str(path))
        return _Part(f"{path}[{split}]", path.name, list(enumerate(ds[split], start=1)))
    return _Part(str(path), path.name, list(enumerate(ds, start=1)))


def _decode(data: bytes, path: Path) -> str:
    """UTF-8, without the byte-order mark that Windows tools (Excel, Notepad) write first."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"invalid UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8",
                        str(path), line) from None


def _read_jsonl(path: Path) -> list[Row]:
    """Per-line decoding, so one bad line is one skippable bad record."""
    rows: list[Row] = []
    with path.open("rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                rows.append((line, _BadRecord("invalid_utf8", f"invalid UTF-8 ({e.reason} at byte {e.start}); "
                                              "re-encode the file as UTF-8", str(path), line)))
                continue
            if line == 1:
                text = text.removeprefix("\ufeff")  # a byte-order mark, which json.loads refuses
            if not text.strip():
                continue
            try:
                rows.append((line, json.loads(text)))
            except json.JSONDecodeError as e:
                rows.append((line, _BadRecord("malformed_json", f"malformed JSON ({e.msg} at column {e.colno})",
                                              str(path), line)))
    return rows


def _read_json(path: Path) -> list[Row]:
    """A JSON list of objects, keeping each item's starting line; a .json file of JSON lines is read as jsonl.

    A malformed list cannot be resynchronised, so its errors always raise (skip_bad does not apply).
    """
    text = _decode(path.read_bytes(), path)
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] == "{":
        return _read_jsonl(path)
    if not text.strip():
        return []
    if text[start] != "[":
        raise DataError("expected a JSON list of objects (or JSON lines); convert the file", str(path),
                        text.count("\n", 0, start) + 1)
    decoder, rows, pos, line = json.JSONDecoder(), [], start + 1, 1 + text.count("\n", 0, start)
    try:
        while True:
            nxt = _skip_ws(text, pos)
            line += text.count("\n", pos, nxt)
            if text[nxt:nxt + 1] == "]" and not rows:
                pos = nxt
                break
            obj, end = decoder.raw_decode(text, nxt)
            rows.append((line, obj))
            line += text.count("\n", nxt, end)
            pos = _skip_ws(text, end)
            line += text.count("\n", end, pos)
            if text[pos:pos + 1] == "]":
                break
            if text[pos:pos + 1] != ",":
                raise json.JSONDecodeError("expected ',' or ']'", text, pos)
            pos += 1
        if text[pos + 1:].strip():
            raise json.JSONDecodeError("extra data after the list", text, _skip_ws(text, pos + 1))
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON ({e.msg} at column {e.colno}); fix the file", str(path), e.lineno) from None
    return rows


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_csv(path: Path) -> list[Row]:
    """CSV with a header row; line numbers are those of each record's first physical line."""
    reader = csv.DictReader(io.StringIO(_decode(path.read_bytes(), path), newline=""))
    rows: list[Row] = []
    start = 2  # line 1 is the header
    for row in reader:
        rows.append((start, row))
        start = reader.line_num + 1
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq  # pyarrow comes with `datasets`; imported here to keep startup light

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"cannot read parquet ({e}); check the file", str(path)) from None
    return list(enumerate(table.to_pylist(), start=1))


def _read_hub(source: str, split: str) -> list[Row]:
    import datasets  # heavy import, needed only for hub ids and local dataset folders

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # hub, network and builder errors all come through here
        raise DataError(f"cannot load Hugging Face dataset split '{split}' ({type(e).__name__}: {e}); check the id "
                        "and network, or pass a local .jsonl/.json/.csv/.parquet file", source) from None
    return list(enumerate(ds, start=1))


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


# --- records ----------------------------------------------------------------------------------------------------


def _detect(rows: list[Row], where: str, has_field_map: bool) -> str:
    """The format whose signature fields the first readable record has."""
    first = next((r for _, r in rows if isinstance(r, dict)), None)
    if first is None:  # nothing readable: report the first record's own error
        line, row = rows[0]
        raise row if isinstance(row, _BadRecord) else _BadRecord(
            "not_an_object", f"expected an object, got {type(row).__name__}", where, line)
    keys = set(first)
    if "output" in keys and "instruction" in keys:
        return "minillm"
    if "response" in keys and "instruction" in keys:
        return "dolly"
    if has_field_map:
        return "custom"  # the map says which fields hold what, whatever else the record has
    if keys & set(conv.LIST_KEYS):  # whatever the value: a csv cell holding a conversation gets its own error
        return conv.style(first.get("messages", first.get("conversations")))
    if isinstance(first.get("prompt"), list):  # MiniLLM's `prompt` is a string, and its records matched above
        return "prompt-completion"
    if "references" in keys and "instruction" in keys:
        return "prefkd"
    # A prompt-only record of prefkd's own fields (a distillation prompt set) has nothing else to go by.
    if "instruction" in keys and keys <= {"instruction", "input", "category", "kind", "id"}:
        return "prefkd"
    raise DataError(f"cannot tell the format from the first record's fields {sorted(keys)}; pass format= one of "
                    f"{', '.join(repr(f) for f in FORMATS[1:])}, or map the fields, e.g. instruction='question', "
                    "references='answer'", where)


def _convert(row: object, fmt: str, field_map: dict[str, str], where: str, line: int,
             require_references: bool = True) -> Instruction:
    if not isinstance(row, dict):
        raise _BadRecord("not_an_object", f"expected an object, got {type(row).__name__}", where, line)
    if fmt in CONVERSATIONAL:
        return _conversation(row, fmt, where, line, require_references)
    if fmt == "prefkd" and not field_map:
        return _prefkd(row, where, line, require_references)
    names = {**_MAPPINGS["custom" if fmt == "prefkd" else fmt], **field_map}
    instruction = _text(row, names["instruction"], where, line, required=True)
    refs = (_references(row, names["references"], where, line) if require_references or row.get(names["references"])
            else ())
    rec = Instruction(instruction, _text(row, names["input"], where, line), refs,
                      _text(row, names["category"], where, line) or None,
                      (_text(row, names["kind"], where, line) or None) if "kind" in names else None,
                      _id(row, names["id"], where, line))
    if "prompt" in names and row.get(names["prompt"]) is not None:
        _check_prompt(rec, row[names["prompt"]], names["prompt"], where, line)
    return rec


def _conversation(row: dict, fmt: str, where: str, line: int, require_references: bool) -> Instruction:
    """A conversational row; its other top-level keys (datasets carry many: source, scores, ...) are ignored
    except `id` (or `prompt_id`) and a string `category`."""
    try:
        read = conv.prompt_completion_turns if fmt == "prompt-completion" else conv.messages_turns
        turns, reply_field = read(row)
        context, refs = conv.split_conversation(turns, reply_field, require_references)
    except conv.TurnError as e:
        raise _BadRecord(e.reason, e.message, where, line, e.field) from None
    instruction = next(content for role, content in reversed(context) if role == "user")
    category = row.get("category") if isinstance(row.get("category"), str) else None
    id_key = "id" if row.get("id") not in (None, "") else "prompt_id"
    return Instruction(instruction, "", refs, category or None, None, _id(row, id_key, where, line), context)


def _prefkd(row: dict, where: str, line: int, require_references: bool = True) -> Instruction:
    """records.py's own parser (a training file needs references); its errors get a reason for skip_bad."""
    try:
        return parse_record(row, where, line, require_references=require_references)
    except DataError as e:
        msg = str(e)[len(str(DataError("", e.path, e.line, e.field))):]  # the message without its "where: " prefix
        reason = ("missing_field" if msg.startswith("missing") else "wrong_type" if msg.startswith("wrong type")
                  else "unknown_field" if msg.startswith("unknown") else "empty_instruction" if "empty instruction"
                  in msg else "empty_response" if "non-empty" in msg else "invalid_record")
        raise _BadRecord(reason, msg, where, line, e.field) from None


def _text(row: dict, key: str, where: str, line: int, required: bool = False) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise _BadRecord("missing_field", f"missing required field '{key}'", where, line, key)
        return ""  # absent optional fields (input, category) and nulls from csv/parquet/hub are empty
    if not isinstance(value, str):
        raise _BadRecord("wrong_type", f"expected a string, got {type(value).__name__}", where, line, key)
    if required and not value.strip():
        raise _BadRecord("empty_instruction", "empty instruction", where, line, key)
    return value


def _references(row: dict, key: str, where: str, line: int) -> tuple[str, ...]:
    """A response string or a list of reference strings; kept verbatim, blank entries dropped."""
    value = row.get(key)
    if value is None:
        raise _BadRecord("missing_field", f"missing required response field '{key}'", where, line, key)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _BadRecord("wrong_type", "expected a string or a list of strings", where, line, key)
    refs = tuple(v for v in value if v.strip())
    if not refs:
        raise _BadRecord("empty_response", "empty response", where, line, key)
    return refs


def _id(row: dict, key: str, where: str, line: int) -> str | None:
    value = row.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _BadRecord("wrong_type", f"expected a string or integer id, got {type(value).__name__}", where, line,
                         key)
    return str(value)


def _check_prompt(rec: Instruction, prompt: object, key: str, where: str, line: int) -> None:
    """MiniLLM files store the rendered template; ours must match it byte for byte or scores are not comparable."""
    if not isinstance(prompt, str):
        raise _BadRecord("wrong_type", f"expected a string, got {type(prompt).__name__}", where, line, key)
    ours = rec.prompt
    if ours != prompt:
        at = next((i for i, (a, b) in enumerate(zip(ours, prompt, strict=False)) if a != b), min(len(ours),
                                                                                                  len(prompt)))
        raise _BadRecord("prompt_mismatch", f"stored prompt differs from the template rendered from instruction and "
                         f"input (first difference at character {at}: file {prompt[at:at + 20]!r}, rendered "
                         f"{ours[at:at + 20]!r})", where, line, key)

