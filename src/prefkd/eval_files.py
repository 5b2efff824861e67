"""The files of one evaluation directory, so a run can be re-scored, judged and bootstrapped without regenerating.

    predictions.json  {"<seed>": [{"id": ..., "prediction": ...}, ...], ...}: one list per seed, in record order
    records.jsonl     the evaluated records in prefkd's format (ids, references, kind, category)
    scores.json       {group: {"n": prompts, metric: {"mean", "std", "per_seed", "ci95", "ci95_bootstrap"}}}
    per_prompt.jsonl  one row per record: id, kind, category, bucket, each metric averaged over seeds and per seed
    settings.json     model and its identity, data, seeds, sampling, protocol, judge, versions, wall time
    config.yaml       the resolved config and the git commit

Responses to judge can also come from a sample cache of `prefkd generate` / `distill` (rows by index, one seed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from prefkd import atomic
from prefkd.cache import read_cache
from prefkd.data.records import Instruction, read_records, write_records
from prefkd.errors import DataError

FILES = ("predictions.json", "records.jsonl", "scores.json", "per_prompt.jsonl", "settings.json")


def write_evaluation(out: str | Path, records: Sequence[Instruction], predictions: dict[int, list[str]],
                     scores: dict, rows: list[dict], settings: dict) -> None:
    """Every file but config.yaml, each written atomically; scores.json last, so its presence means complete."""
    out = Path(out)
    atomic.write_json(out / "predictions.json",
                      {str(s): [{"id": r.id, "prediction": p} for r, p in zip(records, ps, strict=True)]
                       for s, ps in predictions.items()})
    write_records(out / "records.jsonl", list(records))
    atomic.write_jsonl(out / "per_prompt.jsonl", rows)
    atomic.write_json(out / "settings.json", settings)
    atomic.write_json(out / "scores.json", scores)


def _predictions_file(path: str | Path) -> Path:
    p = Path(path)
    return p / "predictions.json" if p.is_dir() else p


def read_predictions(path: str | Path) -> dict[int, list[dict]]:
    """{seed: [{"id", "prediction"}, ...]} from predictions.json or the evaluation directory holding it."""
    p = _predictions_file(path)
    if not p.is_file():
        raise DataError("no predictions file; pass an evaluation directory written by `prefkd evaluate` or its "
                        "predictions.json", str(p))
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"malformed JSON ({e}); re-run the evaluation", str(p)) from None
    if not isinstance(data, dict) or not data:
        raise DataError("expected an object {seed: [{id, prediction}, ...]}", str(p))
    out: dict[int, list[dict]] = {}
    for seed, rows in data.items():
        if not seed.lstrip("-").isdigit() or not isinstance(rows, list):
            raise DataError(f"key {seed!r}: expected an integer seed with a list of rows", str(p), field=seed)
        for k, row in enumerate(rows):
            if not isinstance(row, dict) or not isinstance(row.get("prediction"), str):
                raise DataError(f"seed {seed} row {k}: expected {{'id': ..., 'prediction': '...'}}", str(p),
                                field="prediction")
        out[int(seed)] = rows
    return out


def align(records: Sequence[Instruction], rows: list[dict], where: str) -> list[str]:
    """Predictions in the order of `records`, matched by id (by position when either side has no ids)."""
    ids = [r.id for r in records]
    if all(row.get("id") is None for row in rows) or all(i is None for i in ids):
        if len(rows) != len(records):
            raise DataError(f"{len(rows)} predictions for {len(records)} records and no ids to match them; they must "
                            "be in the same order, one per record", where)
        return [row["prediction"] for row in rows]
    by_id = {row.get("id"): row["prediction"] for row in rows}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise DataError(f"{len(missing)} of {len(records)} records have no prediction (first id {missing[0]!r}); "
                        "score the data the predictions were made on", where)
    return [by_id[i] for i in ids]


def read_responses(source: str | Path, records: Sequence[Instruction]) -> dict[int, list[str]]:
    """{seed: responses in record order} from predictions.json / an evaluation directory, or a sample cache jsonl
    (seed 0; it must be complete). Matched by id, or by position where there are no ids."""
    p = Path(source)
    if p.suffix == ".jsonl" and p.is_file():
        header, rows = read_cache(p)
        if len(rows) != header["n"]:
            raise DataError(f"incomplete sample cache ({len(rows)} of {header['n']} rows); finish it with the command "
                            "that wrote it", str(p))
        return {0: align(records, [{"id": row.get("id"), "prediction": row["response"]} for row in rows], str(p))}
    return {seed: align(records, rows, str(_predictions_file(p))) for seed, rows in read_predictions(p).items()}


def read_records_of(eval_dir: str | Path) -> list[Instruction]:
    p = Path(eval_dir) / "records.jsonl"
    if not p.is_file():
        raise DataError("no records.jsonl in this evaluation directory; pass data=... with the evaluated records",
                        str(p))
    return read_records(p)


def read_per_prompt(eval_dir: str | Path) -> list[dict]:
    p = Path(eval_dir) / "per_prompt.jsonl"
    if not p.is_file():
        raise DataError("no per_prompt.jsonl; evaluate (or re-score with `prefkd evaluate --rescore DIR`) first",
                        str(p))
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def per_prompt_matrix(eval_dirs: Sequence[str | Path], metric: str = "rougeL", group: str = "all") -> np.ndarray:
    """[runs, prompts] of `metric` averaged over sampling seeds: one row per evaluation directory (e.g. one per
    training seed of a method), columns in the first directory's record order; the input of
    `prefkd.stats.bootstrap`. `group` keeps the prompts of one breakdown ("kind:D", "bucket:(0,30]", ...)."""
    if not eval_dirs:
        raise ValueError("no evaluation directories")
    tables = [{row["id"]: row for row in read_per_prompt(d)} for d in eval_dirs]
    ids = list(tables[0])
    for d, t in zip(eval_dirs, tables, strict=True):
        if set(t) != set(ids):
            raise DataError(f"scored on other prompts than {eval_dirs[0]} ({len(set(t) ^ set(ids))} ids differ); "
                            "evaluate every model on the same data", str(d))
        if metric not in t[ids[0]]:
            raise DataError(f"no per-prompt '{metric}' (has {sorted(k for k in t[ids[0]] if '_per_seed' not in k)})",
                            str(d))
    if group != "all":
        key, _, value = group.partition(":")
        ids = [i for i in ids if str(tables[0][i].get(key)) == value]
        if not ids:
            raise ValueError(f"no prompt in group {group!r}")
    return np.array([[t[i][metric] for i in ids] for t in tables], dtype=np.float64)
