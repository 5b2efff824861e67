"""Prepare the papers' data: Dolly train/validation/test splits, training filters, PLaD shards, pretraining text."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from prefkd import atomic
from prefkd.data.chat import renderer_for
from prefkd.data.loaders import load_instructions
from prefkd.data.records import Instruction, write_records
from prefkd.errors import ConfigError, DataError

# A WikiText article title, " = Title = " (sections are " = = Section = = ", so one '=' on each side only).
_WIKI_TITLE = re.compile(r"^ = [^=](?:.*[^=])? = $")
_BLANK_LINES = re.compile(r"\n\s*\n")  # one or more blank (or whitespace-only) lines


def filter_for_training(records: list[Instruction], tokenizer: PreTrainedTokenizerBase, min_response_words: int = 11,
                        max_prompt_tokens: int = 256, max_length: int = 512,
                        template: str = "auto") -> tuple[list[Instruction], dict[str, int]]:
    """Keep records the papers train on; counts are by the first filter a record fails.

    Filters, in order: `short_response` (first reference under `min_response_words` words), `long_prompt`
    (prompt over `max_prompt_tokens` tokens), `too_long` (prompt + response + end token over `max_length` tokens;
    the same arithmetic as collate.encode_examples). The first reference is the one trained on. Records are
    counted as training renders them (`data.chat.Renderer` with `template`, as `data.template`): with the
    tokenizer's chat template when it has one, else Alpaca.
    """
    counts = {"short_response": 0, "long_prompt": 0, "too_long": 0}
    wordy = []
    for r in records:
        if r.references and len(r.references[0].split()) >= min_response_words:
            wordy.append(r)
        else:
            counts["short_response"] += 1
    if not wordy:
        return [], {**counts, "kept": 0}
    renderer = renderer_for(tokenizer, template)
    prompts = renderer.prompt_ids(wordy)
    responses = [renderer.response_ids(r, r.references[0]) for r in wordy]
    kept = []
    for r, p, a in zip(wordy, prompts, responses, strict=True):
        if len(p) > max_prompt_tokens:
            counts["long_prompt"] += 1
        elif len(p) + len(a) > max_length:
            counts["too_long"] += 1
        else:
            kept.append(r)
    return kept, {**counts, "kept": len(kept)}


def _key(r: Instruction) -> tuple[str, str]:
    """(instruction, response) with whitespace collapsed: the files differ only in spacing, if at all."""
    response = r.references[0] if r.references else ""
    return " ".join(r.instruction.split()), " ".join(response.split())


def dolly_splits(dolly_path: str | Path, test_path: str | Path, valid_path: str | Path,
                 seed: int = 0) -> tuple[dict[str, list[Instruction]], dict[str, int]]:
    """MiniLLM/DPKD's Dolly splits: ({"train", "validation", "test"}, report).

    test = the 500-record MiniLLM file, validation = the 1000-record one, train = the rest of the 15k with every
    record whose (instruction, response) matches a test or validation record removed, shuffled with `seed`.
    The report has `source` (15k records), `removed` (dropped from train, duplicates in the 15k included) and
    the size of each split, so that train + removed == source.
    """
    for path, what in ((test_path, "test"), (valid_path, "validation")):
        if not str(path):
            raise ConfigError(f"set the {what} file (e.g. data.dolly.{what}=... or {what}=...): MiniLLM's "
                              f"{'500' if what == 'test' else '1000'}-record Dolly {what} set from MiniLLM's data "
                              "release, which defines the papers' splits")
    test = load_instructions(str(test_path), format="minillm")
    validation = load_instructions(str(valid_path), format="minillm")
    dolly = load_instructions(str(dolly_path), format="dolly")
    held_out = {_key(r) for r in test + validation}
    train = [r for r in dolly if _key(r) not in held_out]
    random.Random(seed).shuffle(train)
    splits = {"train": train, "validation": validation, "test": test}
    report = {"source": len(dolly), "removed": len(dolly) - len(train), **{k: len(v) for k, v in splits.items()}}
    return splits, report


def plad_shards(train: list[Instruction], seed: int = 0,
                fraction: float = 0.5) -> tuple[list[Instruction], list[Instruction]]:
    """(D0, D): PLaD's SFT shard of floor(fraction * n) records and the disjoint distillation shard of the rest.

    Disjoint by position, so a record duplicated in `train` can fall in both; each keeps `train`'s order.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be strictly between 0 and 1, got {fraction}")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n0 = int(len(train) * fraction)
    d0 = set(order[:n0])
    return [r for i, r in enumerate(train) if i in d0], [r for i, r in enumerate(train) if i not in d0]


def _summary(splits: dict[str, list[Instruction]], seed: int, extra: dict | None) -> dict:
    digest = hashlib.sha256()
    for name in sorted(splits):
        digest.update(name.encode())
        for r in splits[name]:
            digest.update(json.dumps(r.to_json(), sort_keys=True, ensure_ascii=False).encode())
    return {"seed": seed, "counts": {k: len(v) for k, v in splits.items()}, "sha256": digest.hexdigest(),
            **(extra or {})}


def write_splits(splits: dict[str, list[Instruction]], out_dir: str | Path, seed: int = 0,
                 extra: dict | None = None) -> bool:
    """Write `<name>.jsonl` per split and `splits.json` (seed, counts, content hash, `extra`); True if written.

    Written once: when `splits.json` already records the same seed, counts and content and every split file is
    there, nothing is touched, so the files' mtimes (and anything cached on them) stay valid.
    """
    out = Path(out_dir)
    summary = _summary(splits, seed, extra)
    old = out / "splits.json"
    if old.is_file() and all((out / f"{name}.jsonl").is_file() for name in splits):
        try:
            previous = json.loads(old.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            previous = None
        if isinstance(previous, dict) and all(previous.get(k) == summary[k] for k in ("seed", "counts", "sha256")):
            return False
    for name, records in splits.items():
        write_records(out / f"{name}.jsonl", records)
    atomic.write_json(old, summary)  # last, so a crash mid-way never leaves a summary for missing files
    return True


def load_corpus(source: str | Path) -> list[str]:
    """Pretraining documents from a text file, empty ones dropped.

    WikiText-style files (any " = Title = " line) are split into articles at those title lines, each starting
    with its title; other files are split on blank lines (paragraphs, or speeches in Tiny Shakespeare).
    """
    path = Path(source)
    if not path.is_file():
        raise DataError("file not found; pass a UTF-8 text file", str(path))
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"invalid UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8", str(path),
                        data.count(b"\n", 0, e.start) + 1) from None
    lines = text.splitlines()
    if any(_WIKI_TITLE.match(line) for line in lines):
        docs, current = [], []
        for line in lines:
            if _WIKI_TITLE.match(line) and current:
                docs.append("\n".join(current))
                current = []
            current.append(line)
        docs.append("\n".join(current))
    else:
        docs = _BLANK_LINES.split(text.replace("\r\n", "\n"))
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise DataError("no documents; the file is empty", str(path))
    return docs
