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

from prefkd.data.chat import Renderer
from prefkd.data.collate import Example, encode_examples
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


def assert_same_value_and_grads(model: torch.nn.Module, got: torch.Tensor, want: torch.Tensor,
                                rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Two scalars computed on `model` (by two code paths) agree in value and in the gradient they send every
    parameter, to float32 rounding. Both graphs are kept (the caller may differentiate other terms of them)."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    got_grads = torch.autograd.grad(got, params, retain_graph=True)
    want_grads = torch.autograd.grad(want, params, retain_graph=True)
    assert any(g.abs().max() > 0 for g in want_grads)  # a gradient that is zero everywhere would prove nothing
    for (name, _), g, w in zip(named, got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@contextmanager
def lm_head_rows(model: torch.nn.Module):
    """The number of positions per sequence the model's LM head ran on, one entry per forward."""
    rows: list[int] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[1]))
    try:
        yield rows
    finally:
        handle.remove()


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


def reference_examples(tokenizer, records, max_prompt_tokens: int = 256, max_length: int = 512) -> list[Example]:
    """Alpaca prompt + first reference + EOS per record, as SFT trains on them."""
    r = Renderer(tokenizer, "alpaca")
    ex, _ = encode_examples(r.prompt_ids(records), [r.response_ids(x, x.references[0]) for x in records],
                            max_prompt_tokens, max_length)
    return ex


# --- instruct models of three families, each with its real special tokens and chat template -----------------------
# The templates are those the hub models ship (Qwen2.5-Instruct without its tool-calling branch, Meta-Llama-3-Instruct,
# Gemma-it); the tokenizers add a BOS to plain text where the real ones do.

QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant') %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + "
    "'\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")

# family -> (special tokens, bos, eos, pad, generation_config eos tokens, template, end-of-turn token)
CHAT_FAMILIES = {
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>",
              ["<|im_end|>", "<|endoftext|>"], QWEN25_TEMPLATE, "<|im_end|>"),
    "llama": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
              "<|begin_of_text|>", "<|eot_id|>", None, ["<|end_of_text|>", "<|eot_id|>"], LLAMA3_TEMPLATE,
              "<|eot_id|>"),
    "gemma": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<pad>",
              ["<eos>", "<end_of_turn>"], GEMMA_TEMPLATE, "<end_of_turn>"),
}


def chat_tokenizer(family: str, texts: list[str], vocab_size: int = 600):
    """A byte-level BPE tokenizer trained on `texts` with `family`'s special tokens, BOS rule and chat template."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing

    special, bos, eos, pad, _, template, _ = CHAT_FAMILIES[family]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=special,
                            show_progress=False)
    if bos is not None:  # Llama 3 and Gemma tokenizers put a BOS before plain text
        bpe._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, bpe.token_to_id(bos))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=bos, eos_token=eos, pad_token=pad,
                                  additional_special_tokens=[t for t in special if t not in (bos, eos, pad)])
    tok.chat_template = template
    return tok


def save_chat_model(path: Path, family: str, tokenizer, seed: int = 0, layers: int = 1, width: int = 32) -> str:
    """A tiny instruct model of `family` (Qwen2, Llama or Gemma architecture) saved as a hub model is."""
    from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    gen_eos = [tokenizer.convert_tokens_to_ids(t) for t in CHAT_FAMILIES[family][4]]
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=gen_eos,
               pad_token_id=tokenizer.pad_token_id)
    shape = dict(num_hidden_layers=layers, hidden_size=width, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=2 * width, max_position_embeddings=512)
    torch.manual_seed(seed)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **shape, **ids))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **shape, **ids))
    else:
        model = GemmaForCausalLM(GemmaConfig(head_dim=width // 2, **shape, **ids))
    model.generation_config.eos_token_id = gen_eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


# Conversations in TRL's messages format: system prompts, one to three turns. Gemma's template refuses a system
# turn, so its files leave them out (`chat_rows`).
CHAT_CONVERSATIONS = [
    {"id": "c1", "messages": [{"role": "system", "content": "Answer in one or two words."},
                              {"role": "user", "content": "Name a colour."},
                              {"role": "assistant", "content": "Blue."},
                              {"role": "user", "content": "Another one?"},
                              {"role": "assistant", "content": "Red."}]},
    {"id": "c2", "messages": [{"role": "user", "content": "What is two plus two?"},
                              {"role": "assistant", "content": "Four."},
                              {"role": "user", "content": "And two plus three?"},
                              {"role": "assistant", "content": "Five."},
                              {"role": "user", "content": "And three plus three?"},
                              {"role": "assistant", "content": "Six."}]},
    {"id": "c3", "messages": [{"role": "user", "content": "Name a fruit."},
                              {"role": "assistant", "content": "An apple."}]},
    {"id": "c4", "messages": [{"role": "system", "content": "You are a helpful assistant."},
                              {"role": "user", "content": "Say hello."},
                              {"role": "assistant", "content": "Hello there."}]},
    {"id": "c5", "messages": [{"role": "user", "content": "Name an animal."},
                              {"role": "assistant", "content": "A cat."},
                              {"role": "user", "content": "A bigger one?"},
                              {"role": "assistant", "content": "A horse."}]},
    {"id": "c6", "messages": [{"role": "user", "content": "Is the sky blue?"},
                              {"role": "assistant", "content": "Yes, on a clear day."}]},
]


def chat_rows(family: str) -> list[dict]:
    """CHAT_CONVERSATIONS as `family`'s template takes them (Gemma: without system turns)."""
    if family != "gemma":
        return CHAT_CONVERSATIONS
    return [{**row, "messages": [m for m in row["messages"] if m["role"] != "system"]} for row in CHAT_CONVERSATIONS]


def chat_texts(rows: list[dict]) -> list[str]:
    """Texts to train a chat tokenizer on: every turn's content and role name, repeated so that BPE merges them."""
    words = ["system", "user", "assistant", "model", "You are Qwen, created by Alibaba Cloud."]
    return [m["content"] for row in rows for m in row["messages"]] * 4 + words * 4


def chat_record(row: dict):
    """A messages row as the loader makes it a record: the turns before the last assistant turn are the context,
    that turn the reference (a row ending with a user turn is a prompt without one)."""
    from prefkd.data.records import Instruction

    turns = row["messages"]
    reply = turns[-1]["role"] == "assistant"
    context = tuple((m["role"], m["content"]) for m in (turns[:-1] if reply else turns))
    return Instruction(context[-1][1], references=(turns[-1]["content"],) if reply else (), id=row["id"],
                       context=context)


def marked_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The stretches of `ids` that `mask` marks, each as its own list (one per trained assistant turn)."""
    runs, current = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


DROPS_EARLIER_REPLIES = (  # ChatML that writes an earlier assistant turn without its content (as reasoning
    # templates drop earlier thinking): the prompt of a later turn is no continuation of an earlier one
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] != 'assistant' or loop.last %}"
    "{{ m['content'] }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def free_port() -> int:
    """A TCP port nobody listens on now, on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, log_path: Path, port: int | None = None, timeout: float = 180.0):
    """`prefkd serve --model MODEL` on 127.0.0.1 and a free port, once /v1/models answers: (process, base URL).
    The caller stops it with `stop_server`."""
    import subprocess
    import sys
    import time

    import httpx

    port = port or free_port()
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "prefkd.cli", "serve", "--model", str(model), "--port", str(port),
                             "batch_wait_ms=20"], stdout=log, stderr=subprocess.STDOUT, env=cli_env())
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefkd serve exited with {proc.returncode}: {Path(log_path).read_text()}")
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"prefkd serve did not answer within {timeout} s: {Path(log_path).read_text()}")


def stop_server(proc) -> None:
    """Stop a server from `start_server` (SIGTERM, then SIGKILL) and wait for it."""
    import subprocess

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
