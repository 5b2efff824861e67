"""Batched sampling with KV cache: prompts grouped by length, left-padded, each row leaving the batch at its EOS."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    PreTrainedModel,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

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
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start: start + cfg.batch_size]
        width = max(len(prompt_ids[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            n = len(prompt_ids[i])
            ids[row, width - n:] = torch.tensor(prompt_ids[i])
            attn[row, width - n:] = 1
        for row, response in zip(idx, _decode(model, ids.to(device), attn.to(device), cfg, eos_id), strict=True):
            out[row] = response
        if on_batch:
            on_batch(len(idx))
    model.train(was_training)
    return out


def _processors(cfg: SamplingConfig) -> LogitsProcessorList:
    """transformers' own processors and warpers, in the order `generate` applies them."""
    procs = LogitsProcessorList()
    if cfg.no_repeat_ngram_size > 0:
        procs.append(NoRepeatNGramLogitsProcessor(cfg.no_repeat_ngram_size))
    if cfg.temperature > 0:
        if cfg.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k > 0:
            procs.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0:
            procs.append(TopPLogitsWarper(cfg.top_p))
    return procs


def _decode(model: PreTrainedModel, ids: torch.Tensor, attn: torch.Tensor, cfg: SamplingConfig,
            eos_id: int) -> list[list[int]]:
    """Sample continuations of a left-padded batch with a KV cache; a row leaves the batch at its EOS.

    What `generate` does, except that finished rows stop costing anything: with short and long responses in one
    batch, `generate` keeps computing every row until the longest one ends. Each row still samples from exactly
    the same distribution (transformers' processors, positions from the attention mask as `generate` sets them).
    """
    procs = _processors(cfg)
    out: list[list[int]] = [[] for _ in range(len(ids))]
    rows = torch.arange(len(ids), device=ids.device)  # batch row -> output row
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    step = model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True, logits_to_keep=1)
    past, seqs = step.past_key_values, ids
    for t in range(cfg.max_new_tokens):
        scores = procs(seqs, step.logits[:, -1].float())
        nxt = scores.argmax(-1) if cfg.temperature <= 0 else torch.multinomial(scores.softmax(-1), 1).squeeze(1)
        for r, token in zip(rows.tolist(), nxt.tolist(), strict=True):
            out[r].append(token)
        alive = nxt != eos_id
        if t == cfg.max_new_tokens - 1 or not alive.any():
            break
        if not alive.all():
            keep = alive.nonzero().squeeze(1)
            past.batch_select_indices(keep)
            rows, attn, positions, seqs, nxt = rows[keep], attn[keep], positions[keep], seqs[keep], nxt[keep]
        attn = torch.cat([attn, attn.new_ones((len(attn), 1))], dim=1)
        positions = positions[:, -1:] + 1
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        step = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=positions, past_key_values=past,
                     use_cache=True)
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
