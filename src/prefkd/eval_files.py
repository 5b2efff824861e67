"""The files of one evaluation directory, so a run can be re-scored, judged and bootstrapped without regenerating.

    predictions.json    {"<seed>": [{"id": ..., "prediction": ...}, ...], ...}: one list per seed, in record order
    records.jsonl       the evaluated records in prefkd's format (ids, references, kind, category)
    scores.json         {group: {"n": prompts, metric: {"mean", "std", "per_seed", "ci95", "ci95_bootstrap"}}}
    prompt_scores.json  {"ids": [...], "seeds": [...], metric: [[score per prompt] per seed], ...}
    settings.json       model and its identity, data, seeds, sampling, protocol, judge, versions, wall time
    config.yaml         the resolved config and the git commit

Responses to judge can also come from a sample cache of `prefkd generate` / `distill` (one seed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from prefkd import atomic
from prefkd.cache import read_cache
from prefkd.data.loaders import load_instructions
from prefkd.data.records import Instruction, write_records
from prefkd.errors import DataError
from prefkd.evaluate import groups

FILES = ("predictions.json", "records.jsonl", "scores.json", "prompt_scores.json", "settings.json")


def write_evaluation(out: str | Path, records: Sequence[Instruction], predictions: dict[int, list[str]],
                     scores: dict, prompt_scores: dict[str, np.ndarray], settings: dict,
                     extra: dict[str, np.ndarray] | None = None) -> None:
    """Every file but config.yaml, each written atomically; scores.json last, so its presence means complete.

    `prompt_scores` maps each metric to its [seeds, prompts] matrix; `extra` adds per-prompt vectors (e.g. the judge's
    score of the best reference) to prompt_scores.json."""
    out = Path(out)
    atomic.write_json(out / "predictions.json",
                      {str(s): [{"id": r.id, "prediction": p} for r, p in zip(records, ps, strict=True)]
                       for s, ps in predictions.items()})
    write_records(out / "records.jsonl", list(records))
    atomic.write_json(out / "prompt_scores.json",
                      {"ids": [r.id for r in records], "seeds": list(predictions),
                       **{m: np.asarray(v).tolist() for m, v in {**prompt_scores, **(extra or {})}.items()}})
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
    return load_instructions(str(p), format="prefkd")


def read_prompt_scores(eval_dir: str | Path) -> dict:
    """prompt_scores.json of an evaluation directory: {"ids", "seeds", metric: [seed][prompt], ...}."""
    p = Path(eval_dir) / "prompt_scores.json"
    if not p.is_file():
        raise DataError("no prompt_scores.json; evaluate (or re-score with `prefkd evaluate --rescore DIR`) first",
                        str(p))
    return json.loads(p.read_text(encoding="utf-8"))


def per_prompt_matrix(eval_dirs: Sequence[str | Path], metric: str = "rougeL", group: str = "all") -> np.ndarray:
    """[runs, prompts] of `metric` averaged over sampling seeds: one row per evaluation directory (e.g. one per
    training seed of a method), columns in the first directory's record order; the input of
    `prefkd.stats.bootstrap`. `group` keeps the prompts of one breakdown of scores.json ("kind:D", "bucket:(0,30]",
    "category:open_qa", ...), read from the first directory's records.jsonl."""
    if not eval_dirs:
        raise ValueError("no evaluation directories")
    tables = [read_prompt_scores(d) for d in eval_dirs]
    ids = tables[0]["ids"]
    rows = []
    for d, t in zip(eval_dirs, tables, strict=True):
        if set(t["ids"]) != set(ids) or len(t["ids"]) != len(ids):
            raise DataError(f"scored on other prompts than {eval_dirs[0]} ({len(set(t['ids']) ^ set(ids))} ids "
                            "differ); evaluate every model on the same data", str(d))
        if metric not in t:
            have = sorted(k for k in t if k not in ("ids", "seeds"))
            raise DataError(f"no per-prompt '{metric}' (has {have})", str(Path(d) / "prompt_scores.json"))
        by_id = dict(zip(t["ids"], np.asarray(t[metric], dtype=np.float64).mean(axis=0), strict=True))
        rows.append([by_id[i] for i in ids])
    cols = list(range(len(ids)))
    if group != "all":
        found = groups(read_records_of(eval_dirs[0]))
        if group not in found:
            raise ValueError(f"no prompt in group {group!r}; groups: {sorted(found)}")
        cols = found[group]
    return np.array(rows, dtype=np.float64)[:, cols]
