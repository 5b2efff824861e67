"""Helpers shared by the tests: small record files, tiny local models (nothing from the hub), subprocess settings."""

from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import BertWordPieceTokenizer
from tokenizers.processors import BertProcessing
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    PreTrainedTokenizerFast,
)

from prefkd.data.records import write_records
from prefkd.data.synthetic import SuiteConfig, build_suite
from prefkd.models import build_model, save_pretrained


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
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def save_lm(path: Path, tokenizer, size: str = "nano", seed: int = 0, max_positions: int = 128) -> str:
    save_pretrained(build_model("gpt2", size, tokenizer, max_positions, seed), tokenizer, path)
    return str(path)


def save_gpt2_reward_model(path: Path, tokenizer, seed: int = 0) -> str:
    """A GPT-2 sequence classifier with one output (the reward), saved with the BPE tokenizer."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=128, num_labels=1,
                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                     bos_token_id=tokenizer.bos_token_id)
    model = GPT2ForSequenceClassification(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def save_bert_reward_model(path: Path, texts: list[str], seed: int = 0) -> str:
    """An encoder reward model with a locally trained WordPiece tokenizer: text pairs become [CLS] q [SEP] a [SEP],
    as with DeBERTa reward models."""
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(texts, vocab_size=300, min_frequency=1, show_progress=False)
    wp.post_processor = BertProcessing(("[SEP]", wp.token_to_id("[SEP]")), ("[CLS]", wp.token_to_id("[CLS]")))
    tok = PreTrainedTokenizerFast(tokenizer_object=wp._tokenizer, unk_token="[UNK]", sep_token="[SEP]",
                                  pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]", model_max_length=64)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=1,
                     pad_token_id=tok.pad_token_id)
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
