"""`prefkd prepare`: Dolly splits compatible with MiniLLM / DPKD, optionally sharded for the PLaD protocol."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from prefkd import atomic
from prefkd.config import opt
from prefkd.console import console
from prefkd.data.prepare import dolly_splits, load_corpus, plad_shards, write_splits


@dataclass
class PrepareRun:
    out: str = opt("data/dolly", "directory for train/validation/test (and d0 / d_prompts) jsonl")
    dolly: str = opt("databricks/databricks-dolly-15k", "Dolly 15k: the hub id or a local copy in its own format")
    test: str = opt("", "MiniLLM's 500-record Dolly test set (a local file from MiniLLM's data release)")
    validation: str = opt("", "MiniLLM's 1000-record Dolly validation set (a local file from MiniLLM's data release)")
    min_response_words: int = opt(11, "drop training records whose response is shorter (papers' filter)")
    plad_fraction: float = opt(0.0, "0 = no shards; else share of train in the SFT shard d0 (PLaD: 0.5); the rest "
                                    "becomes d (references kept for the teacher) and d_prompts (prompts only)")
    corpus: str = opt("", "optional text file (e.g. WikiText-2) written as corpus.txt for the LM-loss term")
    seed: int = opt(0, "shuffle and shard seed")


def run_prepare(cfg: PrepareRun) -> dict:
    splits, report = dolly_splits(cfg.dolly, cfg.test, cfg.validation, cfg.seed)
    train = [r for r in splits["train"] if len(r.references[0].split()) >= cfg.min_response_words]
    report["short_responses_removed"] = len(splits["train"]) - len(train)
    splits["train"] = train
    if cfg.plad_fraction:
        d0, d = plad_shards(train, cfg.seed, cfg.plad_fraction)
        # The student may see D's prompts only; D's references train the teacher.
        splits.update(d0=d0, d=d, d_prompts=[replace(r, references=()) for r in d])
    report.update({k: len(v) for k, v in splits.items()})
    if cfg.corpus:
        docs = load_corpus(cfg.corpus)
        atomic.write_text(Path(cfg.out) / "corpus.txt", "\n\n".join(docs))
        report["corpus_documents"] = len(docs)
    written = write_splits(splits, cfg.out, cfg.seed, {"report": report})
    console.print(f"{'wrote' if written else 'kept'} {cfg.out}: {report}")
    return report
