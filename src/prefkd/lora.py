"""Optional LoRA training of the student (PLaD setup: r 8, alpha 32, dropout 0.1), built on peft.

With `r: 0` (the default) nothing changes: every weight trains. With `r > 0` the attention and MLP projections get
low-rank adapters and only those train. A trained student is saved either merged (a plain transformers model that
loads with stock `AutoModelForCausalLM.from_pretrained`) or as an adapter alone (small; needs its base model).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from prefkd import atomic, models
from prefkd.config import opt
from prefkd.errors import PrefkdError

SAVE_MODES = ("merged", "adapter")
# GPT-2 stores its projections as transformers' Conv1D (weight transposed relative to nn.Linear).
_ADAPTABLE = (torch.nn.Linear, Conv1D)


@dataclass
class LoRAConfig:
    r: int = opt(0, "LoRA rank; 0 = train all weights")
    alpha: int = opt(32, "LoRA scaling numerator: updates are scaled by alpha / r")
    dropout: float = opt(0.1, "dropout on the LoRA branch's input")
    target_modules: list[str] = opt([], "module names to adapt; empty = auto-detected")
    save: str = opt("merged", "merged: save the merged full model; adapter: save only the adapter")


def _adaptable_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Linear / Conv1D modules by full name, without the output head (it is tied to the embeddings)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules()
            if isinstance(m, _ADAPTABLE) and m is not head and name.rsplit(".", 1)[-1] != "lm_head"}


def detect_target_modules(model: torch.nn.Module) -> list[str]:
    """The attention / MLP projections' names (last name component), e.g. c_attn, c_fc, c_proj for GPT-2."""
    names = sorted({name.rsplit(".", 1)[-1] for name in _adaptable_modules(model)})
    if not names:
        raise PrefkdError(f"found no linear layers to adapt in {type(model).__name__}; "
                          "set lora.target_modules to the names of its projection modules, or lora.r=0")
    return names


def _targets_conv1d(model: torch.nn.Module, targets: list[str]) -> bool:
    """Whether the targeted modules are Conv1D, which peft must know (fan_in_fan_out) to transpose correctly."""
    wanted = set(targets)
    matched = [m for name, m in _adaptable_modules(model).items() if name.rsplit(".", 1)[-1] in wanted]
    return bool(matched) and all(isinstance(m, Conv1D) for m in matched)


def check_config(cfg: LoRAConfig) -> None:
    """Fail before training, not after it, on a value that would only bite at save time."""
    if cfg.r < 0:
        raise PrefkdError(f"lora.r must be 0 (off) or a positive rank, got {cfg.r}")
    if cfg.save not in SAVE_MODES:
        raise PrefkdError(f"unknown lora.save '{cfg.save}'; choose one of {', '.join(SAVE_MODES)}")


def apply_lora(model: PreTrainedModel, cfg: LoRAConfig) -> PreTrainedModel | peft.PeftModel:
    """Wrap `model` with LoRA adapters (in place: the base modules are replaced); r == 0 returns it unchanged."""
    check_config(cfg)
    if cfg.r == 0:
        return model
    targets = list(cfg.target_modules) or detect_target_modules(model)
    lora = peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=cfg.r, lora_alpha=cfg.alpha,
                           lora_dropout=cfg.dropout, target_modules=targets,
                           fan_in_fan_out=_targets_conv1d(model, targets))
    try:
        return peft.get_peft_model(model, lora)
    except ValueError as e:  # peft's message for target names that match nothing
        raise PrefkdError(f"cannot apply LoRA to {type(model).__name__}: {e}") from None


def save_trained(model: PreTrainedModel | peft.PeftModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path,
                 cfg: LoRAConfig) -> None:
    """Save a trained student atomically: a plain model, a merged LoRA model, or the LoRA adapter alone."""
    check_config(cfg)
    if not isinstance(model, peft.PeftModel):
        models.save_pretrained(model, tokenizer, out_dir)
    elif cfg.save == "merged":
        # Merge a copy: merge_and_unload rewrites the modules in place, and the caller may keep training.
        merged = copy.deepcopy(model).merge_and_unload()
        models.save_pretrained(merged, tokenizer, out_dir)
    elif cfg.save == "adapter":
        with atomic.directory(out_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)


def n_trainable(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
