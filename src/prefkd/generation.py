"""Batched sampling with KV cache: prompts grouped by length, left-padded, responses cut at the first EOS."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from prefkd.config import opt
from prefkd.console import console
from prefkd.errors import PrefkdError


@dataclass
class SamplingConfig:
    temperature: float = opt(1.0, "sampling temperature; 0 means greedy decoding")
    top_k: int = opt(0, "0 = no top-k filtering (pure sampling, the paper protocol)")
    top_p: float = opt(1.0, "nucleus sampling threshold; 1.0 = off")
    max_new_tokens: int = opt(256, "longest response generated")
    no_repeat_ngram_size: int = opt(0, "MiniLLM's test script uses 6; 0 = off")
    batch_size: int = opt(32, "prompts per generate call")


@torch.no_grad()
def sample_responses(model: PreTrainedModel, prompt_ids: list[list[int]], cfg: SamplingConfig, pad_id: int,
                     eos_id: int, seed: int | None = None,
                     on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """Sample one response per prompt. Each response ends with EOS unless it hit `max_new_tokens`."""
    if seed is not None:
        torch.manual_seed(seed)
    prompt_ids = _fit_context(model, prompt_ids, cfg.max_new_tokens)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))  # less padding per batch
    out: list[list[int]] = [[] for _ in prompt_ids]
    sampling = dict(do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p) \
        if cfg.temperature > 0 else dict(do_sample=False)
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start: start + cfg.batch_size]
        width = max(len(prompt_ids[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            n = len(prompt_ids[i])
            ids[row, width - n:] = torch.tensor(prompt_ids[i])
            attn[row, width - n:] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                             max_new_tokens=cfg.max_new_tokens, no_repeat_ngram_size=cfg.no_repeat_ngram_size,
                             pad_token_id=pad_id, eos_token_id=eos_id, **sampling)
        for row, i in enumerate(idx):
            new = gen[row, width:].tolist()
            out[i] = new[: new.index(eos_id) + 1] if eos_id in new else new
        if on_batch:
            on_batch(len(idx))
    model.train(was_training)
    return out


def _fit_context(model: PreTrainedModel, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Cut prompts from the left so prompt + max_new_tokens fits the model's context, and say how many were cut."""
    ctx = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if not ctx:
        return prompt_ids
    room = ctx - max_new_tokens
    if room <= 0:
        raise PrefkdError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a {ctx}-token context")
    cut = sum(len(p) > room for p in prompt_ids)
    if cut:
        console.print(f"{cut} of {len(prompt_ids)} prompts were cut from the left to fit {ctx} positions "
                      f"with {max_new_tokens} new tokens")
    return [p[-room:] if len(p) > room else p for p in prompt_ids]
