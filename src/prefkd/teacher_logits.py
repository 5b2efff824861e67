"""Offline teacher logits: the teacher's top-k next-token log-probs on every response token of a set of sequences,
computed once (`prefkd teacher-logits`) and read by token-level methods instead of a live teacher (`teacher.logits`).

A cache is a directory:
- `manifest.json`: the format, the key of its settings, the teacher's identity (`cache.model_identity`), the
  tokenizer's identity (a fingerprint of the vocabulary, its size, the template kind and the chat template), k, the
  dtype of the log-probs, the data's fingerprint, the shards and one row per sequence: its fingerprint (the ids of
  prompt and response), shard, first row and number of rows (= response tokens, end token included);
- `shard-NNNNN.safetensors`: for a fixed range of sequences, `ids` int32 [N, k] (sorted by descending probability),
  `logprobs` [N, k] in float16 (default), bfloat16 or float32, and `tail` float32 [N], the log of the mass of the
  other tokens; row r of a sequence is the distribution that predicts its response token r. Each shard's metadata
  holds the cache key.

Resumable as the sample caches are: the manifest is written first (atomically), each shard through a temporary file
that is fsynced and renamed, so a killed run leaves only whole shards; a rerun keeps every shard whose metadata
carries the same key and computes the rest; a directory of other settings is refused unless overwritten. The
manifest says `complete` once every shard is there; only a complete cache trains.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel

from prefkd import atomic, rundir
from prefkd.console import progress
from prefkd.data.chat import Renderer
from prefkd.data.collate import Example, collate
from prefkd.errors import ConfigError, DataError, PrefkdError
from prefkd.stages import fingerprint

FORMAT = "prefkd-teacher-logits-v1"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MANIFEST = "manifest.json"
RECORD_FIELDS = ["sequence", "shard", "offset", "length"]


def sequence_key(e: Example) -> str:
    """Fingerprint of a sequence's token ids: how a run finds its sequence in a cache (and proves it the same)."""
    h = hashlib.sha256()
    h.update(torch.tensor(e.prompt_ids, dtype=torch.int64).numpy().tobytes())
    h.update(b"|")
    h.update(torch.tensor(e.response_ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:20]


def tokenizer_identity(renderer: Renderer) -> dict:
    """What makes token ids mean the same tokens and records render to the same ids."""
    tok = renderer.tokenizer
    return {"vocab": fingerprint(sorted(tok.get_vocab().items())), "size": len(tok), "template": renderer.kind,
            "chat_template": tok.chat_template if renderer.kind == "chat" else None}


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


@dataclass
class Settings:
    model_id: str  # cache.model_identity of the teacher
    tokenizer: dict  # tokenizer_identity
    k: int
    dtype: str
    sequences: str  # what the sequences are: "references" or the samples cache they come from
    shard_records: int = 256


def build(model: PreTrainedModel, renderer: Renderer, examples: list[Example], out: str | Path, settings: Settings,
          batch_size: int = 8, overwrite: bool = False, dropped: int = 0) -> dict:
    """Compute (or complete) the cache of `examples` in `out`; returns the manifest."""
    out = Path(out)
    if settings.dtype not in DTYPES:
        raise ConfigError(f"dtype '{settings.dtype}' is not one of {', '.join(DTYPES)}")
    if settings.k < 1:
        raise ConfigError(f"top_k must be >= 1, got {settings.k}")
    if settings.shard_records < 1:
        raise ConfigError(f"shard_records must be >= 1, got {settings.shard_records}")
    if not examples:
        raise DataError("no sequence to compute teacher logits for", str(out))
    keys = [sequence_key(e) for e in examples]
    data = fingerprint(keys)
    key = fingerprint(FORMAT, settings.model_id, settings.tokenizer, settings.k, settings.dtype, data,
                      settings.shard_records)
    _claim(out, key, overwrite)
    n = len(examples)
    ranges = [range(s, min(s + settings.shard_records, n)) for s in range(0, n, settings.shard_records)]
    records, shards = [], []
    for i, r in enumerate(ranges):
        offset = 0
        for j in r:
            records.append([keys[j], i, offset, len(examples[j].response_ids)])
            offset += len(examples[j].response_ids)
        shards.append({"file": shard_name(i), "first": r.start, "count": len(r), "tokens": offset})
    manifest = {"format": FORMAT, "key": key, "complete": False, "model": settings.model_id,
                "tokenizer": settings.tokenizer, "k": settings.k, "dtype": settings.dtype, "data": data,
                "sequences": settings.sequences, "n_sequences": n, "dropped": dropped,
                "shard_records": settings.shard_records, "tokens": sum(s["tokens"] for s in shards),
                "shards": shards, "record_fields": RECORD_FIELDS, "records": records}
    atomic.write_json(out / MANIFEST, manifest)
    missing = [i for i, s in enumerate(shards) if not _shard_ok(out / s["file"], key, s["tokens"], settings.k)]
    if missing:
        device = next(model.parameters()).device
        model.eval()
        with progress() as bar:
            task = bar.add_task("teacher logits", total=n, completed=n - sum(len(ranges[i]) for i in missing),
                                info=f"top-{settings.k}")
            for i in missing:
                tensors = _compute_shard(model, [examples[j] for j in ranges[i]], settings.k, DTYPES[settings.dtype],
                                         renderer.tokenizer.pad_token_id, batch_size, device,
                                         lambda m: bar.update(task, advance=m))
                _write_shard(out / shards[i]["file"], tensors, {"key": key, "shard": str(i)})
    size = sum((out / s["file"]).stat().st_size for s in shards)
    manifest.update(complete=True, bytes=size, bytes_per_token=round(size / max(1, manifest["tokens"]), 2))
    atomic.write_json(out / MANIFEST, manifest)
    return manifest


def _claim(out: Path, key: str, overwrite: bool) -> None:
    """May `out` hold this cache? Refuses other settings unless `overwrite` (which clears it)."""
    for stale in out.glob(".shard-*.tmp") if out.is_dir() else []:
        stale.unlink(missing_ok=True)  # a temporary file of a killed run
    path = out / MANIFEST
    old = _read_json(path)
    if overwrite and out.exists():
        rundir.remove(out)  # afresh, whatever it holds
        return
    if old is not None and old.get("key") != key or old is None and out.is_dir() and any(
            p.name != MANIFEST and not p.name.startswith(("shard-", ".")) for p in out.iterdir()):
        what = "teacher logits of other settings (model, tokenizer, data, k or dtype)" if old is not None else \
            "files that are not a teacher-logits cache"
        raise rundir.RunDirError(f"{out} holds {what}; choose another --out, or pass --overwrite to compute it "
                                 "afresh")
    # A manifest cut or removed: its shards are checked one by one against the key in their metadata.


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _shard_ok(path: Path, key: str, tokens: int, k: int) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            return (meta.get("key") == key and f.get_slice("ids").get_shape() == [tokens, k]
                    and f.get_slice("tail").get_shape() == [tokens])
    except Exception:  # a missing, cut or foreign file: computed again
        return False


@torch.no_grad()
def _compute_shard(model: PreTrainedModel, examples: list[Example], k: int, dtype: torch.dtype, pad_id: int,
                   batch_size: int, device: torch.device, advance) -> dict[str, torch.Tensor]:
    ids, logps, tails = [], [], []
    for start in range(0, len(examples), batch_size):
        batch_ex = examples[start:start + batch_size]
        batch = {name: v.to(device) for name, v in collate(batch_ex, pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        for row, e in enumerate(batch_ex):
            first = len(e.prompt_ids) - 1  # the position that predicts the first response token
            logp = torch.log_softmax(logits[row, first:first + len(e.response_ids)].float(), dim=-1)
            kk = min(k, logp.shape[-1])
            values, top = logp.topk(kk, dim=-1)
            tail = torch.logsumexp(logp.scatter(-1, top, -torch.inf), dim=-1)
            if kk < k:  # a teacher with fewer tokens than k: pad with tokens of probability 0
                values = torch.cat([values, values.new_full((len(values), k - kk), -torch.inf)], dim=-1)
                top = torch.cat([top, top.new_full((len(top), k - kk), -1)], dim=-1)
            ids.append(top.to(torch.int32).cpu())
            logps.append(values.to(dtype).cpu())
            tails.append(tail.cpu())
        advance(len(batch_ex))
    return {"ids": torch.cat(ids), "logprobs": torch.cat(logps), "tail": torch.cat(tails)}


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TeacherLogits:
    """A complete cache, opened for training: the top-k of a batch's sequences at their response positions.

    `tail` ("renorm" or "bucket", losses/top_k.py) and `temperature` (of the method's divergence) say how the
    top-k become a distribution."""

    def __init__(self, path: str | Path, tail: str = "renorm", temperature: float = 1.0):
        self.path, self.tail, self.temperature = Path(path), tail, temperature
        where = f"teacher.logits={path}"
        manifest = _read_json(self.path / MANIFEST)
        if manifest is None:
            raise ConfigError(f"{where}: no readable {MANIFEST}; not a cache written by `prefkd teacher-logits`")
        if manifest.get("format") != FORMAT:
            raise ConfigError(f"{where}: format {manifest.get('format')!r}, not {FORMAT}")
        if not manifest.get("complete"):
            done = sum(_shard_ok(self.path / s["file"], manifest["key"], s["tokens"], manifest["k"])
                       for s in manifest["shards"])
            raise ConfigError(f"{where} is incomplete ({done} of {len(manifest['shards'])} shards): rerun "
                              "`prefkd teacher-logits` with the same settings to complete it")
        self.manifest, self.k = manifest, int(manifest["k"])
        self.records = {r[0]: (r[1], r[2], r[3]) for r in manifest["records"]}
        self._files = []
        for s in manifest["shards"]:
            file = self.path / s["file"]
            if not _shard_ok(file, manifest["key"], s["tokens"], self.k):
                raise ConfigError(f"{where}: {file.name} is missing or not this cache's (key, shape); rerun "
                                  "`prefkd teacher-logits` with the same settings to rebuild it")
            self._files.append(safe_open(str(file), "pt"))

    @property
    def identity(self) -> str:
        """What a run trained from this cache depends on (part of its run key)."""
        return f"teacher-logits:{self.manifest['key']}:{self.tail}"

    def check(self, renderer: Renderer, examples: list[Example], source: str) -> None:
        """Refuse a student whose tokens are not the cache's, or sequences the cache does not hold."""
        where = f"teacher.logits={self.path}"
        ours, theirs = tokenizer_identity(renderer), self.manifest["tokenizer"]
        if ours["vocab"] != theirs["vocab"]:
            raise ConfigError(f"{where} was computed with another tokenizer ({theirs['size']} tokens, vocabulary "
                              f"{theirs['vocab']}) than the student's ({ours['size']} tokens, vocabulary "
                              f"{ours['vocab']}): its token ids would name other tokens. Compute it with a teacher "
                              "that shares the student's tokenizer")
        if ours["template"] != theirs["template"] or ours["chat_template"] != theirs["chat_template"]:
            other = " (another chat template)" if ours["template"] == theirs["template"] else ""
            raise ConfigError(f"{where} was computed on sequences rendered with the {theirs['template']} template; "
                              f"this run renders them with {renderer.name}{other}: the token ids differ. Use the "
                              "same data.template for both")
        missing = [e for e in examples if sequence_key(e) not in self.records]
        if missing:
            e = missing[0]
            text = renderer.tokenizer.decode(e.response_ids[:12])
            raise ConfigError(f"{where}: {len(missing)} of this run's {len(examples)} sequences ({source}) are not "
                              f"in the cache (the first: response {text!r}...). The cache holds "
                              f"{len(self.records)} sequences of {self.manifest['sequences']}; compute it on this "
                              "run's sequences: the same records, responses (references, or the same teacher "
                              "samples), template and length limits")

    def batch(self, examples: list[Example], length: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [B, length, k] int64, log-probs float32, tail float32 [B, length]) aligned with shifted logits
        (position t scores token t + 1); zeros outside the response positions."""
        b = len(examples)
        ids = torch.zeros((b, length, self.k), dtype=torch.int64)
        logps = torch.zeros((b, length, self.k), dtype=torch.float32)
        tail = torch.zeros((b, length), dtype=torch.float32)
        for row, e in enumerate(examples):
            key = sequence_key(e)
            if key not in self.records:
                raise PrefkdError(f"teacher.logits={self.path}: a sequence of this batch is not in the cache")
            shard, offset, n = self.records[key]
            f, first = self._files[shard], len(e.prompt_ids) - 1
            ids[row, first:first + n] = f.get_slice("ids")[offset:offset + n].long()
            logps[row, first:first + n] = f.get_slice("logprobs")[offset:offset + n].float()
            tail[row, first:first + n] = f.get_slice("tail")[offset:offset + n]
        return ids.to(device), logps.to(device), tail.to(device)


def describe(manifest: dict) -> str:
    return (f"{manifest['n_sequences']} sequences, {manifest['tokens']} response tokens, top-{manifest['k']} in "
            f"{manifest['dtype']}: {manifest.get('bytes', 0) / 2**20:.1f} MiB, "
            f"{manifest.get('bytes_per_token', 0)} bytes per token")

