"""Load any causal LM by hub id or path, build small GPT-2 / Llama configs, train a byte-level BPE tokenizer.

Built models are ordinary transformers models saved with `save_pretrained`: a student distilled here loads with
stock `AutoModelForCausalLM.from_pretrained(path)`, exactly like `gpt2-xl` would.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.activations import GELUTanh, NewGELUActivation

from prefkd import atomic
from prefkd.config import opt
from prefkd.data.chat import Renderer
from prefkd.errors import PrefkdError

transformers.utils.logging.disable_progress_bar()

EOS = "<|endoftext|>"
# name -> (layers, width, heads)
SIZES: dict[str, tuple[int, int, int]] = {
    "nano": (1, 32, 2),
    "micro": (2, 64, 2),
    "tiny": (2, 128, 2),
    "mini": (3, 192, 3),
    "small": (4, 256, 4),
    "base": (6, 384, 6),
}


@dataclass
class ModelConfig:
    path: str = opt("", "hub id or local path of a causal LM; empty builds a fresh model from arch and size")
    arch: str = opt("gpt2", "architecture of a built model: gpt2 or llama")
    size: str = opt("tiny", f"size of a built model: {', '.join(SIZES)}")
    max_positions: int = opt(512, "context length of a built model")
    trust_remote_code: bool = opt(False, "allow a hub model's own code to run (off unless you trust it)")
    dtype: str = opt("float32", "dtype of the loaded weights: float32, bfloat16, float16 or auto (the checkpoint's); "
                                "a trained student stays float32, a frozen teacher may be bfloat16")


def build_model(arch: str, size: str, tokenizer: PreTrainedTokenizerBase, max_positions: int = 512,
                seed: int = 0) -> PreTrainedModel:
    if size not in SIZES:
        raise PrefkdError(f"unknown model size '{size}'; choose one of {', '.join(SIZES)}")
    layers, width, heads = SIZES[size]
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    if arch == "gpt2":
        # Dropout off: the small built models underfit rather than overfit, and sampling stays deterministic.
        cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, n_positions=max_positions, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_pytorch_tanh", **ids)
        return GPT2LMHeadModel(cfg)
    if arch == "llama":
        cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads,
                          num_key_value_heads=heads, intermediate_size=width * 8 // 3,
                          max_position_embeddings=max_positions, tie_word_embeddings=True, **ids)
        return LlamaForCausalLM(cfg)
    raise PrefkdError(f"unknown architecture '{arch}'; choose gpt2 or llama")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE tokenizer (pad == eos == bos) trained on `texts`."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=EOS)


# ChatML as Qwen2 and SmolLM2 write it, without a default system prompt: what `add_chat_format` gives a built model.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def add_chat_format(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Give a built tokenizer ChatML's special tokens (`<|im_start|>`, `<|im_end|>`) and chat template, so that a
    model built with it is trained and distilled in a chat format, as an instruct model is."""
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _cannot_load("a tokenizer", path, e) from None
    if tok.eos_token_id is None:
        raise PrefkdError(f"tokenizer at '{path}' has no EOS token; responses need one to end")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # GPT-2 convention; masks never rely on pad != eos
    return tok


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_model(path: str, trust_remote_code: bool = False, dtype: str | torch.dtype | None = None) -> PreTrainedModel:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise PrefkdError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=dtype)
    except pickle.UnpicklingError:  # torch.load(weights_only=True) met something other than tensors in a .bin file
        raise PrefkdError(f"cannot load a causal LM from '{path}': its .bin weight file holds Python objects, not "
                          f"just tensors, and was refused unread; use safetensors weights from a source you trust") \
            from None
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a truncated or corrupt weight file
        raise _cannot_load("a causal LM", path, e) from None
    return fused_gelu(model)


def fused_gelu(model: PreTrainedModel) -> PreTrainedModel:
    """GPT-2's `gelu_new` (five tensor ops in Python) -> the same tanh-approximate GELU as one fused torch kernel.

    Equal up to float rounding (transformers names both "tanh GELU"); a few percent of a training step on CPU
    and more of sampling. The config is updated, so a saved model loads with the fused one too."""
    if getattr(model.config, "activation_function", None) != "gelu_new":
        return model
    model.config.activation_function = "gelu_pytorch_tanh"
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(module, name, GELUTanh())
    return model


def _cannot_load(what: str, path: str, e: Exception) -> PrefkdError:
    """The library's reason on one line (its first), plus what to do when the model wants to run its own code."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "trust_remote_code" in str(e):
        first += " It runs only with trust_remote_code=true for this model (e.g. teacher.trust_remote_code=true)."
    return PrefkdError(f"cannot load {what} from '{path}': {first}")


def model_from_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    if cfg.path:
        return load_model(cfg.path, cfg.trust_remote_code, cfg.dtype)
    return build_model(cfg.arch, cfg.size, tokenizer, cfg.max_positions, seed)


def save_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    """Save model (safetensors) and tokenizer together, atomically; the generation config stops at every end token
    (`end_token_ids`)."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = end_token_ids(model, tokenizer)
    with atomic.directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def end_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int | list[int]:
    """What a saved model's generation config stops at: its chat template's end-of-turn token first, the
    tokenizer's EOS, then the end tokens the model already lists (an instruct model's list, e.g. Gemma's <eos> and
    <end_of_turn>), so that stock `generate` ends a reply where prefkd's sampling does (`Renderer.stop_ids_for`).
    One id stays an int."""
    had = model.generation_config.eos_token_id
    had = [] if had is None else [had] if isinstance(had, int) else list(had)
    end_of_turn = []
    if getattr(tokenizer, "chat_template", None):
        try:
            end_of_turn = Renderer(tokenizer, "chat").end_ids
        except Exception:  # a template prefkd cannot read (a run with data.template=alpaca): the end of a run
            pass  # must not fail over a stop token
    ids = list(dict.fromkeys([*end_of_turn, tokenizer.eos_token_id, *had]))
    return ids[0] if len(ids) == 1 else ids


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resolve_device(name: str = "auto") -> str:
    """"auto" = the GPU when there is one, else the CPU; anything else is passed to torch as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
