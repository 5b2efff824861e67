"""Prefix sharing: prompts that begin with the same template run it once, in the sampler's prefill and in the packed
forwards of training (a template -> prompt -> responses tree).

The template's keys and values (a cache of its positions, from one forward) become the past of each prompt's own
tokens, which see it through the 4-D mask at the positions they would have inside the whole prompt. Causal attention
makes a prefix's keys and values independent of what follows it, so this is the plain computation of each prompt
whole, within float rounding. Under autograd the gradient reaching the shared keys and values is the sum over the
prompts that read them, as it is over the copies of the plain computation: the gradients are the same too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from prefkd.packing import Group, Packed, model_config, pack, packed_forward, packing_supported

# Below this many shared tokens an extra forward and a wider mask cost about what they save (and an instruction
# template is longer: Alpaca's is 24 tokens of the demo's tokenizer, a chat template's system turn more).
MIN_SHARE = 16

Past = list[tuple[torch.Tensor, torch.Tensor]]  # per layer, [1, heads, positions, d] keys and values

_ENABLED: ContextVar[bool] = ContextVar("prefkd_prefix_sharing", default=True)


@contextmanager
def prefix_sharing(enabled: bool) -> Iterator[None]:
    """Prefix sharing in the training forwards on or off within a block: the tests and the benchmark compare the
    plain computation with it off. (The sampler always shares: it is tested token for token against `generate`.)"""
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def shared_prefixes(prompts: list[list[int]], min_share: int = MIN_SHARE) -> list[tuple[int, list[int]]]:
    """(prefix length, prompts) of groups of at least two prompts whose first `min_share` or more tokens agree (an
    instruction template), each prompt keeping one token of its own. Sorted prompts with a common prefix are
    neighbours, so one pass finds the groups."""
    groups: list[tuple[int, list[int]]] = []
    for i in sorted(range(len(prompts)), key=lambda i: prompts[i]):
        p = prompts[i]
        if groups:
            k, members = groups[-1]
            head = prompts[members[0]]
            common = 0
            limit = min(k, len(p) - 1)
            while common < limit and head[common] == p[common]:
                common += 1
            if common >= min_share:
                groups[-1] = (common, members + [i])
                continue
        groups.append((len(p) - 1, [i]))
    return [(k, members) for k, members in groups if len(members) > 1]


@dataclass
class Shared:
    """Where each prompt's shared prefix lies in the past: the groups' prefixes one after another."""

    prefixes: list[list[int]]  # one per group of prompts
    shared: torch.Tensor  # [n] leading tokens each prompt takes from the past (0: none)
    past_at: torch.Tensor  # [n] where they begin in it


def find_shared(prompts: list[list[int]], min_share: int = MIN_SHARE) -> Shared | None:
    """The shared prefixes of `prompts` (`shared_prefixes`), or None when no two prompts share `min_share` tokens."""
    groups = shared_prefixes(prompts, min_share)
    if not groups:
        return None
    shared = torch.zeros(len(prompts), dtype=torch.long)
    past_at = torch.zeros(len(prompts), dtype=torch.long)
    at = 0
    for k, members in groups:
        shared[members], past_at[members] = k, at
        at += k
    return Shared([prompts[members[0]][:k] for k, members in groups], shared, past_at)


def runs(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(run, j) over the tokens of runs of `counts` tokens: which run each token is in and its index within it."""
    run = torch.repeat_interleave(torch.arange(len(counts)), counts)
    return run, torch.arange(len(run)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)


def plain_cache(cache) -> bool:
    """Whether a cache holds every position's keys and values as they are (not a sliding window's, say)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer or getattr(layer, "keeps_every_position", False)
                                for layer in layers)


def prefix_past(model: torch.nn.Module, prefixes: list[list[int]], device: torch.device) -> Past | None:
    """Per layer, the keys and values of the prefixes one after another (one packed forward; differentiable when
    autograd is on), or None for a model whose cache is not plain per-token keys and values."""
    packed = pack([(p, []) for p in prefixes])
    keep = torch.zeros(packed.input_ids.shape, dtype=torch.bool)
    keep[packed.starts[0, 0], packed.starts[0, 1]] = True  # the model wants some logits; these are not used
    out = packed_forward(model, packed, keep, device, use_cache=True)
    if not plain_cache(out.cache):
        return None
    run, j = runs(torch.tensor([len(p) for p in prefixes]))
    rows, cols = packed.starts[run, 0].to(device), (packed.starts[run, 1] + j).to(device)
    # [rows, heads, L, d] indexed at (row, :, col): [tokens, heads, d], the prefixes' tokens in order
    return [(layer.keys[rows, :, cols].transpose(0, 1)[None], layer.values[rows, :, cols].transpose(0, 1)[None])
            for layer in out.cache.layers]


def after_shared_prefix(rows: Packed, owner: torch.Tensor, past: Past, shared: torch.Tensor, past_at: torch.Tensor
                        ) -> tuple[Packed, DynamicCache]:
    """Packed rows of prompts' own tokens (prompt `owner` of each token, -1 = padding) made to continue their shared
    prefixes: positions shifted by the prefix's length, the mask widened to see the prompt's prefix in `past`
    (the prefixes one after another), and the cache holding `past` for every row."""
    mine = owner.clamp(min=0)
    first = torch.where(owner >= 0, past_at[mine], past[0][0].shape[2])  # padding sees no past
    past_pos = torch.arange(past[0][0].shape[2])
    seen = (past_pos >= first[..., None]) & (past_pos < (first + shared[mine])[..., None])
    n = len(owner)
    cache = DynamicCache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in past])
    return replace(rows, attention=torch.cat([seen[:, None], rows.attention], -1),
                   position_ids=rows.position_ids + torch.where(owner >= 0, shared[mine], 0)), cache


# ---- training forwards ------------------------------------------------------------------------------------------


def shared_prefix_logits(model: torch.nn.Module, groups: list[Group], device: torch.device,
                         min_share: int = MIN_SHARE) -> tuple[torch.Tensor, Packed] | None:
    """The kept logits of packed `groups` with the prompts' shared prefixes run once, and the packing of the rest
    (prompt remainders and responses) whose `kept_row`, `labels`, `seq` and `pos` index them as `pack(groups)`'s
    would; None where no prompts share `min_share` tokens, no token is scored, or the model's cache is not plain."""
    found = find_shared([p for p, _ in groups], min_share)
    if found is None:
        return None
    packed = pack([(p[k:], rs) for (p, rs), k in zip(groups, found.shared.tolist(), strict=True)])
    if packed.labels.numel() == 0:
        return None
    past = prefix_past(model, found.prefixes, device)
    if past is None:
        return None
    rows, cache = after_shared_prefix(packed, packed.group, past, found.shared, found.past_at)
    return packed_forward(model, rows, packed.keep, device, cache=cache).logits, packed


def sharing_applies(model: torch.nn.Module) -> bool:
    """Whether the training forwards of `model` may share prefixes now: switched on (`prefix_sharing`), a model whose
    packed rows take a past (probed once per kind), and in training mode neither dropout (one draw over a shared
    prefix would tie the prompts' draws together) nor activation checkpointing (transformers drops the past there),
    and weights that are not sharded (FSDP frees a layer's gathered weights after each forward and gathers them once
    for the backward, so the prefix forward's saved weights are gone by the time its gradient is computed)."""
    if not _ENABLED.get() or not packing_supported(model) or _sharded(model):
        return False
    inner = getattr(model, "module", model)  # DDP
    if inner.training and (_dropout_active(inner) or getattr(inner, "is_activation_checkpointing", False)):
        return False
    key = (type(inner), model_config(model)._attn_implementation)
    if key not in _PROBED:
        try:
            _PROBED[key] = _probe(model)
        except Exception:  # a model that rejects a past with a custom mask: no sharing, whatever the reason
            _PROBED[key] = False
    return _PROBED[key]


def _sharded(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # a torch built without distributed support has no FSDP
        return False
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def _dropout_active(model: torch.nn.Module) -> bool:
    """Any dropout that acts in training mode: nn.Dropout modules and Llama-style float `attention_dropout`."""
    return any((isinstance(m, torch.nn.Dropout) and m.p > 0)
               or (isinstance(getattr(m, "attention_dropout", None), float) and m.attention_dropout > 0)
               for m in model.modules())


_PROBED: dict[tuple[type, str], bool] = {}


def _probe(model: torch.nn.Module) -> bool:
    """Log-probs of three prompts sharing a prefix (two responses to one of them) equal those of the plain packed
    forward."""
    top = min(getattr(model_config(model), "vocab_size", 9), 9) - 1
    groups = [([1, 2, 3, 4], [[5], [6, 7]]), ([1, 2, 3, 5, 6], [[8]]), ([1, 2, 3, 6], [[4, 1]])]
    groups = [([t % top + 1 for t in p], [[t % top + 1 for t in r] for r in rs]) for p, rs in groups]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            done = shared_prefix_logits(model, groups, device, min_share=3)
            if done is None:
                return False
            plain = pack(groups)
            want = _scored(packed_forward(model, plain, plain.keep, device).logits, plain)
            got = _scored(*done)
    finally:
        model.train(was_training)
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    return got.shape == want.shape == (4, 2) and bool(((got - want).abs() <= tol).all())


def _scored(logits: torch.Tensor, packed: Packed) -> torch.Tensor:
    """[responses, longest] log-probs of the scored tokens, by response and position (whatever the layout)."""
    logps = torch.log_softmax(logits.float(), -1)[packed.kept_row.to(logits.device), packed.labels.to(logits.device)]
    out = logps.new_zeros((int(packed.seq.max()) + 1, int(packed.pos.max()) + 1))
    return out.index_put((packed.seq.to(out.device), packed.pos.to(out.device)), logps)
