"""Small record files, models and subprocess settings for CLI tests."""

from contextlib import contextmanager

from prefkd.data.records import write_records
from prefkd.data.synthetic import SuiteConfig, build_suite


def tiny_files(tmp_path, tokenizer) -> dict:
    suite = build_suite(SuiteConfig(n_people=8, skill_per_family=2, test_world_questions=2, test_profiles=1,
                                    test_skill=7, val_world_questions=1, val_profiles=1, val_skill=7,
                                    corpus_skill_per_family=2))
    files = {"train": tmp_path / "train.jsonl", "test": tmp_path / "test.jsonl", "corpus": tmp_path / "corpus.txt",
             "tokenizer": tmp_path / "tok"}
    write_records(files["train"], suite.d0)
    write_records(files["test"], suite.test[:6])
    files["corpus"].write_text("\n\n".join(suite.corpus))
    tokenizer.save_pretrained(files["tokenizer"])
    return files


def tiny_models(root, tokenizer) -> dict:
    """Record files plus a random-init teacher (micro) and student (nano) saved as ordinary transformers models, and
    a prompts file without references (distillation prompts, PLaD protocol)."""
    import json

    from prefkd.models import build_model, save_pretrained

    files = tiny_files(root, tokenizer)
    save_pretrained(build_model("gpt2", "micro", tokenizer, seed=1), tokenizer, root / "teacher")
    save_pretrained(build_model("gpt2", "nano", tokenizer, seed=2), tokenizer, root / "student")
    rows = [json.loads(line) for line in files["train"].read_text().splitlines()]
    files["prompts"] = root / "prompts.jsonl"
    files["prompts"].write_text("".join(json.dumps({**r, "references": []}) + "\n" for r in rows))
    return {**files, "teacher": root / "teacher", "student": root / "student"}


def cli_env() -> dict:
    """Environment for a `prefkd` subprocess: one thread per process, so two processes on a 2-core machine do not
    fight over cores, and runs compared bit for bit use the same thread count."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@contextmanager
def one_thread():
    """Subprocesses run with OMP_NUM_THREADS=1 (cli_env); an in-process run compared with them bit for bit must use
    the same thread count, or float reductions may be ordered differently."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
