"""Model and workload shapes for the benchmarks measured at a user's scale: random-initialised GPT-2s, token data.

The benchmarks of the 124M shape (`dpkd_vs_trl_124m`, `onpolicy_vs_trl_gkd`, `sampling_roofline`,
`memory_at_scale`) take `--shape`: `124m` is what they are for (GPT-2 small: 12 layers, 768 wide, 12 heads,
vocabulary 50,257, 1,024 positions; prompts of Dolly length, ~100 tokens, responses of 100-200), `355m` GPT-2
medium's shape (memory only), and `tiny` a few-layer, narrow model with a small vocabulary and short prompts and
responses, which runs every code path in seconds: `make bench-quick` runs it, and its figures say nothing about
speed at scale. Figures of a shape other than 124m carry its name in their key (`..._tiny`), so a quick run never
overwrites a 124M figure.

Random weights are fine for timing (shapes decide the work); a random model draws EOS with probability ~1/vocab,
so its samples run to `max_new_tokens`, which the settings of each benchmark say.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import asdict, dataclass

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from prefkd.data.synthetic import SuiteConfig, build_suite
from prefkd.models import train_tokenizer


@dataclass(frozen=True)
class Arch:
    layers: int
    width: int
    heads: int


@dataclass(frozen=True)
class Shape:
    name: str
    student: Arch
    teacher: Arch
    vocab: int  # the models' vocabulary (LM head rows); the tokenizer may have fewer tokens
    positions: int
    prompt_tokens: tuple[int, int]  # uniform range of prompt lengths
    response_tokens: tuple[int, int]  # uniform range of the pre-sampled responses' lengths (DPO pairs)
    max_new_tokens: int  # sampling benchmarks
    batch: int  # prompts (pairs) per training step

    def describe(self) -> dict:
        return asdict(self)


GPT2_SMALL = Arch(12, 768, 12)
GPT2_MEDIUM = Arch(24, 1024, 16)
SHAPES = {
    "tiny": Shape("tiny", Arch(2, 64, 2), Arch(2, 96, 2), vocab=512, positions=128, prompt_tokens=(12, 20),
                  response_tokens=(8, 16), max_new_tokens=16, batch=4),
    "124m": Shape("124m", GPT2_SMALL, GPT2_SMALL, vocab=50_257, positions=1024, prompt_tokens=(80, 120),
                  response_tokens=(100, 200), max_new_tokens=128, batch=8),
    "355m": Shape("355m", GPT2_MEDIUM, GPT2_MEDIUM, vocab=50_257, positions=1024, prompt_tokens=(80, 120),
                  response_tokens=(100, 200), max_new_tokens=128, batch=8),
}


def shape_for(name: str | None, quick: bool) -> Shape:
    """The shape asked for, or by default 124m (`make bench`) and tiny (`make bench-quick`)."""
    return SHAPES[name or ("tiny" if quick else "124m")]


def key(name: str, shape: Shape) -> str:
    """A figure's key: the issue's names end in `_124m`; another shape's figure carries its own name instead."""
    if shape.name == "124m":
        return name
    return (name[: -len("_124m")] if name.endswith("_124m") else name) + f"_{shape.name}"


def device(name: str | None = None) -> torch.device:
    """`--device` (or BENCH_DEVICE): cpu unless told."""
    return torch.device(name or os.environ.get("BENCH_DEVICE", "cpu"))


def build(arch: Arch, shape: Shape, tokenizer: PreTrainedTokenizerFast, seed: int) -> GPT2LMHeadModel:
    """A random-initialised GPT-2 of `arch` with the shape's vocabulary, set up as `prefkd.models.build_model` sets up
    its GPT-2s (no dropout, the fused tanh GELU)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=arch.layers, n_embd=arch.width, n_head=arch.heads, n_positions=shape.positions,
                     vocab_size=shape.vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     activation_function="gelu_pytorch_tanh", bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(cfg)


def models(shape: Shape, tokenizer: PreTrainedTokenizerFast, dev: torch.device | None = None):
    """(student, teacher): the student trainable, the teacher in eval mode without gradients."""
    dev = dev or torch.device("cpu")
    student = build(shape.student, shape, tokenizer, seed=0).to(dev)
    teacher = build(shape.teacher, shape, tokenizer, seed=1).to(dev).eval().requires_grad_(False)
    return student, teacher


def tokenizer(shape: Shape) -> PreTrainedTokenizerFast:
    """A byte-level BPE (at most 2,048 tokens, as the demo's) trained on the demo suite's texts; the models' LM head
    has `shape.vocab` rows whatever the tokenizer's size."""
    suite = build_suite(SuiteConfig())
    return train_tokenizer(_texts(suite), vocab_size=min(2048, shape.vocab))


def _texts(suite) -> list[str]:
    return [r.prompt + " " + r.references[0] for r in suite.d0 + suite.d] + suite.corpus


def _stream(tok: PreTrainedTokenizerFast) -> list[int]:
    """Token ids of the suite's texts, end to end, without the end token: what prompts and responses are cut from."""
    eos = tok.eos_token_id
    return [i for i in tok("\n".join(_texts(build_suite(SuiteConfig()))))["input_ids"] if i != eos]


def token_data(shape: Shape, tok: PreTrainedTokenizerFast, n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """`n` rows of prompt, chosen and rejected ids, consecutive slices of the suite's token stream with lengths drawn
    uniformly from the shape's ranges (the responses without their end token)."""
    stream = _stream(tok)
    g = torch.Generator().manual_seed(seed)

    def length(lo_hi: tuple[int, int]) -> int:
        return int(torch.randint(lo_hi[0], lo_hi[1] + 1, (), generator=g))

    rows, at = [], 0
    for _ in range(n):
        row = {}
        for part, lengths in (("prompt", shape.prompt_tokens), ("chosen", shape.response_tokens),
                              ("rejected", shape.response_tokens)):
            k = length(lengths)
            if at + k > len(stream):
                at = 0
            row[part], at = stream[at: at + k], at + k
        rows.append(row)
    return rows


def text_data(shape: Shape, tok: PreTrainedTokenizerFast, n: int, seed: int = 0) -> list[dict[str, str]]:
    """The same rows as texts (what TRL's trainers tokenise themselves; the benchmarks read TRL's ids back). Each
    prompt ends with a line break, so that its last word does not merge with the response's first when TRL
    tokenises prompt + response."""
    return [{k: tok.decode(v) + ("\n" if k == "prompt" else "") for k, v in row.items()}
            for row in token_data(shape, tok, n, seed)]


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- peak memory on the device ----------------------------------------------------------------------------------

_LIBC = None


def trim() -> None:
    """Give freed heap memory back to the OS (glibc), so that a later RSS is what is live, not what was."""
    global _LIBC
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except OSError:  # not glibc: RSS then includes freed memory the allocator kept
        pass


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
