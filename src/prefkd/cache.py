"""Resumable on-disk cache of sampled responses (teacher samples for SeqKD, teacher/student pairs for PLaD).

One jsonl file per (model, prompts, sampling settings, seed): a header line `{"cache_key", "n"}`, then one row per
prompt. Rows are appended batch by batch and fsynced, so an interrupted run keeps its finished batches and a rerun
samples only what is missing. Every batch has its own seed, so a resumed run writes exactly the samples an
uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: runs sharing one cache are not supported there
    fcntl = None

from transformers import PreTrainedModel

from prefkd import atomic
from prefkd.console import progress
from prefkd.data.chat import Renderer
from prefkd.data.records import Instruction
from prefkd.errors import DataError, PrefkdError
from prefkd.generation import SamplingConfig, sample_responses
from prefkd.stages import fingerprint

# (prompt ids, sampling, pad id, end ids, seed=) -> one response per prompt, ending with an end token unless cut by
# length.
Sampler = Callable[..., list[list[int]]]
FORMAT = "prefkd-sample-cache-v1"  # bump when the row layout or the seeding scheme changes
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
SEED_STRIDE = 1_000_003  # prime, larger than any prompt count, so batch seeds of different run seeds never collide


def model_identity(path: str) -> str:
    """The model path plus, for a local directory, what changes when the model is retrained in place."""
    local = Path(path)
    if not local.is_dir():
        return path  # a hub id: the name is all we can cheaply know
    config = local / "config.json"
    config_fp = fingerprint(config.read_text(encoding="utf-8")) if config.is_file() else None
    weights = []
    for f in sorted(local.iterdir()):
        if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES):
            st = f.stat()
            # Size + mtime instead of a content hash: hashing multi-GB teacher weights on every run is too slow.
            weights.append((f.name, st.st_size, st.st_mtime_ns))
    return f"{path}@{fingerprint(config_fp, weights)}"


def cache_key(model_id: str, prompts: list[str], sampling: SamplingConfig, seed: int, backend: str = "hf") -> str:
    """The key of samples of rendered `prompts` (`Renderer.prompt`: the template is part of the text)."""
    # batch_size is part of the key on purpose: batches are seeded separately, so it changes the samples.
    # Another backend (vllm) draws other samples for the same seed; "hf" adds nothing, so older keys stay valid.
    return fingerprint(FORMAT, model_id, prompts, dataclasses.asdict(sampling), seed,
                       *([backend] if backend != "hf" else []))


def batch_seed(seed: int, first_index: int) -> int:
    return seed * SEED_STRIDE + first_index


def read_cache(path: str | Path) -> tuple[dict, list[dict]]:
    """Header and rows (sorted by index) of a cache file; a last line cut mid-write is ignored."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found; generate the samples first", str(path))
    header, rows, _ = _scan(path)
    return header, rows


def complete_cache(path: str | Path, key: str, n: int) -> list[dict] | None:
    """The rows of a cache file of this key that holds all `n` samples, else None (nothing is written)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        header, rows, _ = _scan(path)
    except DataError:
        return None
    return rows if header.get("cache_key") == key and header["n"] == n and len(rows) == n else None


def generate_cached(model: PreTrainedModel | None, renderer: Renderer, records: list[Instruction],
                    sampling: SamplingConfig, path: str | Path, key: str, seed: int, name: str = "generate",
                    overwrite: bool = False, sampler: Sampler | None = None) -> list[dict]:
    """Sample one response per record into `path`, reusing or completing a file written with the same `key`.

    Prompts are rendered by `renderer` (the sampled model's tokenizer and template); a response ends at any of the
    model's end tokens. `sampler` replaces `sample_responses(model, ...)` (e.g. the vLLM backend; then `model` may be
    None)."""
    path = Path(path)
    done = _open_for_append(path, key, len(records), overwrite)
    missing = [k for k in _batches(len(records), sampling.batch_size) if any(i not in done for i in k)]
    if missing:
        with progress() as bar:
            task = bar.add_task(name, total=len(records), completed=len(done), info=f"seed {seed}")
            for indices in missing:
                new = _sample_batch(model, renderer, records, indices, sampling, seed, sampler)
                # Rows of a batch cut mid-write are already on disk; keep those, add only the rest.
                new = [row for row in new if row["index"] not in done]
                _append(path, new)
                done.update((row["index"], row) for row in new)
                bar.update(task, advance=len(new))
    return [done[i] for i in sorted(done)]


def _open_for_append(path: Path, key: str, n: int, overwrite: bool) -> dict[int, dict]:
    """Rows already in a matching file (truncated back to its last complete line), or a fresh file with a header."""
    if path.is_file():
        header, rows, complete_bytes = _scan(path)
        if header.get("cache_key") == key:
            if complete_bytes < path.stat().st_size:
                os.truncate(path, complete_bytes)  # so appends do not glue onto a half-written line
            return {row["index"]: row for row in rows}
        if not overwrite:
            raise PrefkdError(f"{path} holds samples of other settings (model, prompts, sampling or seed); "
                              f"remove it, choose another output path, or pass --overwrite (overwrite=true) to sample "
                              f"it afresh")
    # Through a temporary name: a file at `path` always has a complete header.
    atomic.write_jsonl(path, [{"cache_key": key, "n": n}])
    return {}


def _scan(path: Path) -> tuple[dict, list[dict], int]:
    """Header, rows sorted by index (last one wins on a repeat), and the byte length of the complete lines.

    A line is complete when it ends with a newline and parses; only the last line may be incomplete (a run killed
    mid-write), any other bad line is a DataError.
    """
    header: dict | None = None
    rows: dict[int, dict] = {}
    complete = 0
    lines = path.read_bytes().splitlines(keepends=True)
    for lineno, raw in enumerate(lines, start=1):
        obj = _parse_line(raw)
        if obj is None:
            if lineno == len(lines):
                break
            raise DataError("malformed line in a sample cache; delete the file to regenerate it", str(path), lineno)
        complete += len(raw)
        if header is None:
            header = _check_header(obj, path)
        else:
            row = _check_row(obj, path, lineno, header["n"])
            rows[row["index"]] = row
    if header is None:
        raise DataError("no header line; not a sample cache, or written by a killed run before its header",
                        str(path), 1)
    return header, [rows[i] for i in sorted(rows)], complete


def _parse_line(raw: bytes) -> dict | None:
    if not raw.endswith(b"\n"):
        return None  # even if it parses: the writer always ends a line, so the write was cut
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _check_header(obj: dict, path: Path) -> dict:
    if not isinstance(obj.get("cache_key"), str) or not isinstance(obj.get("n"), int):
        raise DataError("first line is not a sample-cache header with cache_key and n", str(path), 1)
    return obj


def _check_row(obj: dict, path: Path, lineno: int, n: int) -> dict:
    index = obj.get("index")
    if not isinstance(index, int) or not 0 <= index < n:
        raise DataError(f"row index {index!r} outside 0..{n - 1}", str(path), lineno, "index")
    if not isinstance(obj.get("response_ids"), list):
        raise DataError("missing list of response_ids", str(path), lineno, "response_ids")
    return obj


def _batches(n: int, batch_size: int) -> list[range]:
    # Fixed boundaries, independent of what is already done, so each batch always sees the same seed and prompts.
    return [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def _sample_batch(model: PreTrainedModel | None, renderer: Renderer, records: list[Instruction],
                  indices: range, sampling: SamplingConfig, seed: int, sampler: Sampler | None = None) -> list[dict]:
    batch = [records[i] for i in indices]
    tokenizer, stops = renderer.tokenizer, renderer.stop_ids_for(model)
    sample = sampler or functools.partial(sample_responses, model)
    responses = sample(renderer.prompt_ids(batch), sampling, tokenizer.pad_token_id, stops,
                       seed=batch_seed(seed, indices.start))
    return [{"index": i, "id": r.id, "prompt": renderer.prompt(r),
             "response": tokenizer.decode(ids, skip_special_tokens=True).strip(),
             "response_ids": ids, "finished": bool(ids) and ids[-1] in stops}
            for i, r, ids in zip(indices, batch, responses, strict=True)]


def _append(path: Path, rows: list[dict]) -> None:
    """Append whole lines and fsync, so a kill loses at most the batch being written. The lock keeps the lines of
    parallel runs sharing a cache (`prefkd compare workers=N`) from interleaving."""
    with path.open("a", encoding="utf-8") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file closes
        f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())


# ---- teacher samples with their log-probs, filled during training ---------------------------------------------

TEACHER_FORMAT = "prefkd-teacher-logp-cache-v1"


def teacher_cache_key(model_id: str, prompt_ids: list[list[int]], sampling: SamplingConfig, seed: int,
                      bf16: bool) -> str:
    # bf16 is in the key: log-probs computed under autocast differ from fp32 ones in the third digit.
    if not isinstance(bf16, bool):  # train.bf16=auto must be resolved first, or one cache would serve both precisions
        raise TypeError(f"teacher_cache_key takes the resolved train.bf16 (true or false), not {bf16!r}")
    return fingerprint(TEACHER_FORMAT, model_id, prompt_ids, dataclasses.asdict(sampling), seed, bf16)


class TeacherCache:
    """One teacher sample y_t per prompt with the teacher's log p(y_t), written the first time the prompt is drawn.

    The teacher is frozen, so both stay valid for the whole run: from the second epoch on, a DPKD step needs
    neither teacher sampling nor a teacher forward on y_t (`distill.dpkd.teacher_samples=cached`). The file holds
    a header, then one line per sampling event (all prompts sampled together in one step), fsynced: a killed run
    loses at most the event being written, and whole events only, so the seeds of a resumed run match.
    """

    def __init__(self, path: str | Path, key: str, seed: int):
        self.path, self.key, self.seed = Path(path), key, seed
        self.rows: dict[int, tuple[list[int], float]] = {}
        if self.path.is_file():
            self._load()
        else:
            atomic.write_jsonl(self.path, [{"cache_key": key, "format": TEACHER_FORMAT}])

    def _load(self) -> None:
        lines = self.path.read_bytes().splitlines(keepends=True)
        complete = 0
        for lineno, raw in enumerate(lines, start=1):
            obj = _parse_line(raw)
            if obj is None:
                if lineno == len(lines):
                    break  # a line cut by a kill: dropped below, its prompts are sampled again
                raise DataError("malformed line in a teacher cache; delete the file to rebuild it", str(self.path),
                                lineno)
            complete += len(raw)
            if lineno == 1:
                if obj.get("cache_key") != self.key:
                    raise PrefkdError(f"{self.path} holds teacher samples of other settings; remove it")
                continue
            for row in obj.get("rows", []):
                self.rows[int(row["index"])] = (row["response_ids"], float(row["teacher_logp"]))
        if complete < self.path.stat().st_size:
            os.truncate(self.path, complete)

    def get(self, index: int) -> tuple[list[int], float] | None:
        return self.rows.get(index)

    def sampling_seed(self, indices: list[int]) -> int:
        """Seed of a sampling event: a prompt is sampled once, so its smallest index names the event."""
        return batch_seed(self.seed, min(indices))

    def add(self, rows: list[tuple[int, list[int], float]]) -> None:
        _append(self.path, [{"rows": [{"index": i, "response_ids": ids, "teacher_logp": logp}
                                      for i, ids, logp in rows]}])
        self.rows.update((i, (ids, logp)) for i, ids, logp in rows)
