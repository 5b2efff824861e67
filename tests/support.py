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


# The team's development data (Dolly 15k, MiniLLM's splits, WikiText-2, Tiny Shakespeare), beside the clone; only
# tests marked `real_data` read it (conftest.py makes them fail where it is missing).
REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_DOLLY = REAL_DATA / "dolly"

# Dolly 15k's and MiniLLM's file formats on records written for the tests (not copied from the dataset): Dolly's
# fields (instruction, context, response, category), MiniLLM's (topic, instruction, input, output, prompt) with its
# prompt template byte for byte, with and without an input.
MINILLM_HEAD = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request.\n\n")
MINILLM_HEAD_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                      "context. Write a response that appropriately completes the request.\n\n")
DOLLY_ROWS = [
    {"instruction": "When did the museum open?", "context": "The museum opened in 1901 on the river bank.",
     "response": "It opened in 1901.", "category": "closed_qa"},
    {"instruction": "Which is a bird, Robin or Rock?", "context": "", "response": "Robin",
     "category": "classification"},
    {"instruction": "Why do cats purr?", "context": "", "response": "Mostly to signal comfort, sometimes stress.",
     "category": "open_qa"},
    {"instruction": "Give me three names for a boat.", "context": "", "response": "Wave Runner, Sea Biscuit, Drift",
     "category": "brainstorming"},
    {"instruction": "Summarise the passage.", "context": "Rain fell for days.\nThe river rose and the town moved.",
     "response": "A long rain flooded the town.", "category": "summarization"},
    {"instruction": "What is a kettle?", "context": "", "response": "A pot for boiling water.",
     "category": "general_qa"},
    {"instruction": "List the colours named.", "context": "The flag is red, white and blue.",
     "response": "red, white, blue", "category": "information_extraction"},
    {"instruction": "Write a haiku about snow.", "context": "",
     "response": "Quiet white blanket\ncovers the garden\nmorning holds its breath",
     "category": "creative_writing"},
    {"instruction": "How many legs does a spider have?", "context": "", "response": "Eight.", "category": "open_qa"},
    {"instruction": "Name a prime number above ten.", "context": "", "response": "Eleven.", "category": "open_qa"},
    {"instruction": "Is tea a drink?", "context": "", "response": "Yes.", "category": "classification"},
    {"instruction": "Who wrote the letter?", "context": "The letter was signed by Ada.", "response": "Ada.",
     "category": "closed_qa"},
]


def minillm_row(row: dict, output=None, topic: bool = True) -> dict:
    """A Dolly row as MiniLLM's split files store it: `topic` for the category (the test file has it, the dev file
    does not), `input` for the context, `output` for the response, and the prompt rendered with the Alpaca
    template."""
    body = f"### Instruction:\n{row['instruction']}\n\n"
    head = MINILLM_HEAD
    if row["context"]:
        body += f"### Input:\n{row['context']}\n\n"
        head = MINILLM_HEAD_INPUT
    out = {"topic": row["category"]} if topic else {}
    return {**out, "instruction": row["instruction"], "input": row["context"],
            "output": row["response"] if output is None else output, "prompt": head + body + "### Response:\n"}


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_dolly_files(root: Path) -> dict:
    """A Dolly file of 13 records and MiniLLM-style test (rows 0-2) and validation (rows 3-4) files cut from it.
    The Dolly file holds row 0 twice, the second time with other whitespace (the real 15k has such duplicates),
    so 6 records are held out of train: 13 = 7 train + 6 removed."""
    root.mkdir(parents=True, exist_ok=True)
    again = {**DOLLY_ROWS[0], "instruction": "  When did the museum\nopen? ", "response": "It opened in  1901."}
    return {"dolly": write_jsonl(root / "dolly.jsonl", [*DOLLY_ROWS, again]),
            "test": write_jsonl(root / "test-minillm.jsonl", [minillm_row(r) for r in DOLLY_ROWS[:3]]),
            "validation": write_jsonl(root / "dev-minillm.jsonl",
                                      [minillm_row(r, topic=False) for r in DOLLY_ROWS[3:5]])}
