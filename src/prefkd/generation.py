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
from transformers.cache_utils import DynamicLayer

from prefkd.config import opt
from prefkd.console import console
from prefkd.errors import PrefkdError
from prefkd.logprobs import pack, packed_forward, packing_supported


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
        prompts = [prompt_ids[i] for i in idx]
        ids, attn = left_padded(prompts, pad_id)
        for row, response in zip(idx, _decode(model, ids.to(device), attn.to(device), cfg, eos_id, prompts),
                                  strict=True):
            out[row] = response
        if on_batch:
            on_batch(len(idx))
    model.train(was_training)
    return out


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of prompts padded on the left to the longest, as decoding wants them."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attn[row, width - len(p):] = 1
    return ids, attn


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


def _prefill(model: PreTrainedModel, ids: torch.Tensor, attn: torch.Tensor, prompts: list[list[int]] | None,
             room: int = 0):
    """(logits of each prompt's last token [B, V], KV cache of the left-padded batch, next positions [B, 1]).

    With `prompts` and a model that takes packed rows, the prompts run packed (no padding computed) and their
    keys and values are then laid out left-padded, as one padded forward would have left them, in `RoomyLayer`s
    with `room` free positions for the decoding steps."""
    if prompts is not None and packing_supported(model):
        packed = pack([(p, []) for p in prompts])
        last = packed.starts[:, 0] * packed.input_ids.shape[1] + packed.starts[:, 1] + torch.tensor(
            [len(p) - 1 for p in prompts])
        keep = torch.zeros(packed.input_ids.numel(), dtype=torch.bool)
        keep[last] = True
        out = packed_forward(model, packed, keep.view(packed.input_ids.shape), ids.device, use_cache=True)
        layers = getattr(out.past_key_values, "layers", None)
        if layers and all(type(layer) is DynamicLayer for layer in layers):  # plain per-token keys and values
            width = ids.shape[1]
            for i, layer in enumerate(layers):
                layers[i] = RoomyLayer(*(_left_padded(t, packed.starts, prompts, width, room)
                                         for t in (layer.keys, layer.values)), width)
            rank = keep.cumsum(0) - 1
            lengths = torch.tensor([[len(p)] for p in prompts], device=ids.device)
            return out.logits[rank[last].to(ids.device)], out.past_key_values, lengths
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], out.past_key_values, positions[:, -1:] + 1


class RoomyLayer(DynamicLayer):
    """A DynamicLayer whose keys and values sit at the front of buffers with room for the tokens still to come.

    DynamicLayer appends each decoding step's key and value with `torch.cat`, copying the whole cache at every step;
    here the step is written in place and `keys` / `values` are views of the filled part (the same numbers)."""

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = key_buffer.dtype, key_buffer.device, True
        self._k, self._v = key_buffer, value_buffer
        self._filled(length)

    def _filled(self, n: int) -> None:
        self.keys, self.values = self._k[..., :n, :], self._v[..., :n, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n, m = self.keys.shape[-2], key_states.shape[-2]
        if n + m > self._k.shape[-2]:  # out of room (not when the room covers max_new_tokens): double it
            self._k, self._v = (torch.cat([b[..., :n, :], b.new_empty((*b.shape[:-2], max(n, m), b.shape[-1]))], -2)
                                for b in (self._k, self._v))
        self._k[..., n: n + m, :], self._v[..., n: n + m, :] = key_states, value_states
        self._filled(n + m)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        n = self.keys.shape[-2]
        for name in ("_k", "_v"):  # copy the kept rows' filled part only; the room is written before it is read
            old = getattr(self, name)
            new = old.new_empty((len(indices), *old.shape[1:]))
            new[..., :n, :] = old[indices, :, :n]
            setattr(self, name, new)
        self._filled(n)


def _left_padded(packed_kv: torch.Tensor, starts: torch.Tensor, prompts: list[list[int]], width: int,
                 room: int = 0) -> torch.Tensor:
    """[rows, heads, L, d] keys or values of packed prompts -> [prompts, heads, width + room, d], each prompt ending
    at position width - 1 (left-padded), then `room` positions for the tokens to come."""
    out = packed_kv.new_empty((len(prompts), packed_kv.shape[1], width + room, packed_kv.shape[3]))
    out[:, :, :width] = 0  # padding is masked, but must not be NaN; the room is written before it is read
    for g, ((row, col), p) in enumerate(zip(starts.tolist(), prompts, strict=True)):
        out[g, :, width - len(p): width] = packed_kv[row, :, col: col + len(p)]
    return out


def _decode(model: PreTrainedModel, ids: torch.Tensor, attn: torch.Tensor, cfg: SamplingConfig,
            eos_id: int, prompts: list[list[int]] | None = None) -> list[list[int]]:
    """Sample continuations of a left-padded batch with a KV cache; a row leaves the batch at its EOS.

    What `generate` does, except that padding and finished rows cost nothing: with short and long responses in
    one batch, `generate` keeps computing every row until the longest one ends. Each row still samples from
    exactly the same distribution (transformers' processors, positions from the attention mask as `generate` sets
    them); `prompts` (the unpadded rows of `ids`) lets the prompts run packed.
    """
    procs = _processors(cfg)
    out: list[list[int]] = [[] for _ in range(len(ids))]
    rows = torch.arange(len(ids), device=ids.device)  # batch row -> output row
    logits, past, positions = _prefill(model, ids, attn, prompts, cfg.max_new_tokens)
    seqs = ids
    for t in range(cfg.max_new_tokens):
        scores = procs(seqs, logits.float())
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
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        logits = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=positions, past_key_values=past,
                       use_cache=True).logits[:, -1]
        positions = positions + 1
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
