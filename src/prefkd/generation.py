"""Batched sampling with KV cache: prompts grouped by length, left-padded, each row leaving the batch at its EOS."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

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
from prefkd.packed_weights import packed_linears, worth_packing
from prefkd.packing import Packed, pack, packed_forward, packing_supported
from prefkd.prefix_sharing import after_shared_prefix, find_shared, plain_cache, prefix_past, runs


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
                     eos_id: int | Sequence[int], seed: int | None = None,
                     on_batch: Callable[[int], None] | None = None,
                     generators: Sequence[torch.Generator] | None = None,
                     pack_weights: bool | None = None) -> list[list[int]]:
    """Sample one response per prompt. Each response ends with one of the end tokens `eos_id` (an id or several:
    a chat model's end-of-turn token and its EOS) unless it hit `max_new_tokens`.

    `generators` (one per prompt) draw each prompt's tokens from its own random stream, so that a prompt's sample
    does not depend on what else is in the batch (`prefkd serve` batches requests with their own seeds).
    `pack_weights`: decode through MKL-packed weights (`packed_weights`); None decides by `worth_packing`."""
    if seed is not None:
        torch.manual_seed(seed)
    prompt_ids = _fit_context(model, prompt_ids, cfg.max_new_tokens)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))  # less padding per batch
    out: list[list[int]] = [[] for _ in prompt_ids]
    sync = InStep.for_model(model, device, pad_id)
    packing = bool(prompt_ids) and not sync and \
        (worth_packing(model, cfg.max_new_tokens) if pack_weights is None else pack_weights)
    starts = list(range(0, len(order), cfg.batch_size))
    if sync:  # every process runs as many batches as the one with the most
        starts += [None] * (sync.most(len(starts)) - len(starts))
    with packed_linears(model, min(cfg.batch_size, len(prompt_ids)), packing):
        for start in starts:
            if start is None:
                sync.idle(cfg.max_new_tokens)
                continue
            idx = order[start: start + cfg.batch_size]
            prompts = [prompt_ids[i] for i in idx]
            ids, attn = left_padded(prompts, pad_id)
            gens = [generators[i] for i in idx] if generators is not None else None
            for row, response in zip(idx, _decode(model, ids.to(device), attn.to(device), cfg, eos_id, prompts,
                                                  gens, sync), strict=True):
                out[row] = response
            if on_batch:
                on_batch(len(idx))
    model.train(was_training)
    return out


class InStep:
    """Decoding in step across the processes of a model whose weights are sharded (FSDP2): each of its forwards
    gathers the weights from every process, so every process must run as many forwards as the others. As
    `generate(synced_gpus=True)` does, a process whose rows have all ended (or that has no batch left) keeps
    running a one-token forward until every process is done; each step, one all-reduce says whether any is not.
    The prefill then runs as one forward of the left-padded batch (the packed prefill runs a number of forwards
    that depends on the prompts)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, pad_id: int):
        self.model, self.device, self.pad_id = model, device, pad_id

    @classmethod
    def for_model(cls, model: torch.nn.Module, device: torch.device, pad_id: int) -> InStep | None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return None
        from torch.distributed.fsdp import FSDPModule

        return cls(model, device, pad_id) if any(isinstance(m, FSDPModule) for m in model.modules()) else None

    def most(self, n: int) -> int:
        import torch.distributed as dist

        t = torch.tensor([n], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def any_going_on(self, going_on: bool) -> bool:
        """Whether any process runs another decoding forward (a collective: every process calls it each step)."""
        return self.most(int(going_on)) > 0

    def forward_alone(self) -> None:
        """A forward whose result nobody reads: this process's part of the others' weight gathers."""
        self.model(input_ids=torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device), use_cache=False)

    def idle(self, max_new_tokens: int) -> None:
        """A batch this process does not have: the prefill's forward, then every decoding step the others run."""
        self.forward_alone()
        for _ in range(max_new_tokens - 1):
            if not self.any_going_on(False):
                return
            self.forward_alone()


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

    With `prompts` (the unpadded rows of `ids`) and a model that takes packed rows, the prompts run packed: see
    `_packed_prefill`. Otherwise one forward of the left-padded batch."""
    if prompts is not None and packing_supported(model):
        done = _packed_prefill(model, prompts, ids.shape[1], room, ids.device)
        if done is not None:
            return done
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], out.cache, positions[:, -1:] + 1


def _packed_prefill(model: PreTrainedModel, prompts: list[list[int]], width: int, room: int,
                    device: torch.device):
    """`_prefill` of packed prompts, or None for a model whose cache is not plain per-token keys and values.

    - Prompts that begin with the same template (`prefix_sharing.shared_prefixes`) run that prefix once: its keys
      and values are the past of their remaining tokens, as they would be inside each prompt (causal attention, same
      positions).
    - The packed rows of the remaining tokens run in groups of similar filled width, each cut to its widest row, so
      that neither padding nor the long rows' width is computed for short prompts.
    - The keys and values are then laid out left-padded to `width`, as one padded forward would have left them, in
      `RoomyLayer`s with `room` free positions for the decoding steps."""
    n = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    shared = torch.zeros(n, dtype=torch.long)  # leading tokens each prompt takes from the shared past
    past_at = torch.zeros(n, dtype=torch.long)  # where they begin in it
    past = None
    found = find_shared(prompts)
    if found is not None:
        past = prefix_past(model, found.prefixes, device)
        if past is None:
            return None
        shared, past_at = found.shared, found.past_at
    n_past = past[0][0].shape[2] if past else 0
    rest = lengths - shared
    packed = pack([(p[k:], []) for p, k in zip(prompts, shared.tolist(), strict=True)])
    logits = None
    buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
    for rows in _row_groups(packed, rest):
        members = torch.isin(packed.starts[:, 0], rows).nonzero().squeeze(1)
        w = int((packed.starts[members, 1] + rest[members]).max())
        local = torch.zeros(len(packed.input_ids), dtype=torch.long)
        local[rows] = torch.arange(len(rows))
        src_row, src_col = local[packed.starts[members, 0]], packed.starts[members, 1]
        keep = torch.zeros((len(rows), w), dtype=torch.bool)
        keep[src_row, src_col + rest[members] - 1] = True
        sub = replace(packed, input_ids=packed.input_ids[rows, :w], position_ids=packed.position_ids[rows, :w],
                      attention=packed.attention[rows][..., :w, :w], group=packed.group[rows, :w])
        cache = None
        if n_past:
            sub, cache = after_shared_prefix(sub, sub.group, past, shared, past_at)
        out = packed_forward(model, sub, keep, device, use_cache=True, cache=cache)
        if not plain_cache(out.cache):
            return None
        layers = out.cache.layers
        if logits is None:
            logits = out.logits.new_empty((n, out.logits.shape[-1]))
            buffers = [tuple(_room_buffer(t, n, width, room) for t in (layer.keys, layer.values)) for layer in layers]
            if n_past:  # every prompt's shared prefix, from the past
                everyone = torch.arange(n)
                for kv_buffers, kv_past in zip(buffers, past, strict=True):
                    for buffer, t in zip(kv_buffers, kv_past, strict=True):
                        _copy_runs(buffer, everyone, width - lengths, t, torch.zeros(n, dtype=torch.long),
                                   past_at, shared)
        order = (src_row * w + src_col).argsort()  # the kept logits come in row-major order
        logits[members[order].to(device)] = out.logits
        for kv_buffers, layer in zip(buffers, layers, strict=True):
            for buffer, t in zip(kv_buffers, (layer.keys, layer.values), strict=True):
                _copy_runs(buffer, members, width - rest[members], t, src_row, n_past + src_col, rest[members])
    past_layers = out.cache
    past_layers.layers = [RoomyLayer(kb, vb, width) for kb, vb in buffers]
    return logits, past_layers, lengths[:, None].to(device)


def _copy_runs(dst: torch.Tensor, dst_rows: torch.Tensor, dst_at: torch.Tensor, src: torch.Tensor,
               src_rows: torch.Tensor, src_at: torch.Tensor, counts: torch.Tensor) -> None:
    """dst[dst_rows[i], :, dst_at[i] + j] = src[src_rows[i], :, src_at[i] + j] for j < counts[i] ([rows, heads,
    positions, d] keys or values), in one indexed copy."""
    run, j = runs(counts)
    dev = dst.device
    dst.transpose(1, 2)[dst_rows[run].to(dev), (dst_at[run] + j).to(dev)] = \
        src.transpose(1, 2)[src_rows[run].to(dev), (src_at[run] + j).to(dev)]  # transpose: views, the copy lands


def _row_groups(packed: Packed, lengths: torch.Tensor, fill: float = 0.8) -> list[torch.Tensor]:
    """Packed rows in groups of similar filled width, widest first: each group runs cut to its own widest row, so
    short rows do not compute the long rows' padding (a new group starts below `fill` of the group's width)."""
    used = torch.zeros(len(packed.input_ids), dtype=torch.long)
    used.scatter_reduce_(0, packed.starts[:, 0], packed.starts[:, 1] + lengths, "amax")
    groups: list[list[int]] = []
    top = 0
    for r in used.argsort(descending=True, stable=True).tolist():
        if not groups or used[r] < fill * top:
            groups.append([])
            top = int(used[r])
        groups[-1].append(r)
    return [torch.tensor(g) for g in groups]


def _room_buffer(like: torch.Tensor, batch: int, width: int, room: int) -> torch.Tensor:
    """[batch, heads, width + room, d] for left-padded keys or values: the padding is masked but must not be NaN (so
    zeros); the room after the prompts is written before it is read (so left as it is)."""
    buffer = like.new_empty((batch, like.shape[1], width + room, like.shape[3]))
    buffer[:, :, :width] = 0
    return buffer


class RoomyLayer(DynamicLayer):
    """A DynamicLayer whose keys and values sit at the front of buffers with room for the tokens still to come.

    DynamicLayer appends each decoding step's key and value with `torch.cat`, copying the whole cache at every step;
    here the step is written in place and `keys` / `values` are views of the filled part (the same numbers). Rows
    that leave the batch are dropped in place too: the kept rows move to the front of the same buffers."""

    keeps_every_position = True  # a plain cache (`prefix_sharing.plain_cache`)

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = key_buffer.dtype, key_buffer.device, True
        self._k, self._v = key_buffer, value_buffer
        self._filled(len(key_buffer), length)

    def _filled(self, rows: int, n: int) -> None:
        self.keys, self.values = self._k[:rows, :, :n], self._v[:rows, :, :n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        rows, n, m = len(self.keys), self.keys.shape[-2], key_states.shape[-2]
        if n + m > self._k.shape[-2]:  # out of room (not when the room covers max_new_tokens): double it
            self._k, self._v = (torch.cat([b[:rows, :, :n], b.new_empty((rows, b.shape[1], max(n, m), b.shape[3]))], 2)
                                for b in (self._k, self._v))
        self._k[:rows, :, n: n + m], self._v[:rows, :, n: n + m] = key_states, value_states
        self._filled(rows, n + m)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        n = self.keys.shape[-2]
        for b in (self._k, self._v):  # the kept rows' filled part only; the room is written before it is read
            b[: len(indices), :, :n] = b[indices, :, :n]
        self._filled(len(indices), n)


def _decode(model: PreTrainedModel, ids: torch.Tensor, attn: torch.Tensor, cfg: SamplingConfig,
            eos_id: int | Sequence[int], prompts: list[list[int]] | None = None,
            generators: Sequence[torch.Generator] | None = None, sync: InStep | None = None) -> list[list[int]]:
    """Sample continuations of a left-padded batch with a KV cache; a row leaves the batch at its EOS.

    What `generate` does, except that padding and finished rows cost nothing: with short and long responses in
    one batch, `generate` keeps computing every row until the longest one ends. Each row still samples from
    exactly the same distribution (transformers' processors, positions from the attention mask as `generate` sets
    them); `prompts` (the unpadded rows of `ids`) lets the prompts run packed. `sync`: in step with the other
    processes of a sharded model (`InStep`).
    """
    procs = _processors(cfg)
    stops = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=ids.device)
    out: list[list[int]] = [[] for _ in range(len(ids))]
    rows = torch.arange(len(ids), device=ids.device)  # batch row -> output row
    logits, past, positions = _prefill(model, ids, attn, None if sync else prompts, cfg.max_new_tokens)
    # A 4-D mask of the whole batch, filled in place, spares the model building one at every step; the room is all
    # True, written tokens attend.
    full = _custom_mask_ok(model, past)
    if full:
        width = attn.shape[1]
        visible = torch.cat([attn.bool(), attn.new_ones((len(attn), cfg.max_new_tokens), dtype=torch.bool)], 1)
    seqs = ids
    for t in range(cfg.max_new_tokens):
        scores = procs(seqs, logits.float())
        if cfg.temperature <= 0:
            nxt = scores.argmax(-1)
        else:
            nxt = draw(scores, uniforms(len(scores), rows, generators, scores.device))
        for r, token in zip(rows.tolist(), nxt.tolist(), strict=True):
            out[r].append(token)
        alive = ~torch.isin(nxt, stops)
        if t == cfg.max_new_tokens - 1 or not alive.any():
            if sync:  # the others' remaining steps
                while t < cfg.max_new_tokens - 1 and sync.any_going_on(False):
                    sync.forward_alone()
                    t += 1
            break
        if sync:
            sync.any_going_on(True)
        if not alive.all():
            keep = alive.nonzero().squeeze(1)
            past.batch_select_indices(keep)
            rows, positions, seqs, nxt = rows[keep], positions[keep], seqs[keep], nxt[keep]
            if full:
                visible = visible[keep]
            else:
                attn = attn[keep]
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        if full:
            mask = visible[:, None, None, : width + t + 1]
        else:
            attn = torch.cat([attn, attn.new_ones((len(attn), 1))], dim=1)
            mask = attn
        logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions, cache=past,
                       use_cache=True).logits[:, -1]
        positions = positions + 1
    return out


def draw(scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of `scores` [B, V], drawn from softmax(scores) by inverse CDF: the first token whose
    cumulative probability exceeds u * total, u [B] uniform in [0, 1).

    The same distribution as `torch.multinomial` (what `generate` draws with), at one random number per row instead
    of one per vocabulary entry: on a CPU, multinomial's exponential draws over a 50k vocabulary cost more than the
    LM head's matmul. The sums are float64, so a token's share of [0, total) is its probability to ~1e-11 even at
    150k tokens; a token of probability 0 (top-k / top-p) has an empty share and is never drawn, and u * total <
    total, so some token always is."""
    probs = scores.softmax(-1)
    # float64 sums without a float64 copy of the probabilities (the same sums); MPS has no float64
    cdf = (probs if probs.device.type != "mps" else probs.cpu()).cumsum(-1, dtype=torch.float64)
    total = cdf[:, -1]
    if not torch.isfinite(total).all():  # multinomial refuses these too; searchsorted would return V, no token
        raise PrefkdError("sampling: the model's next-token probabilities hold NaN or inf (diverged weights, or "
                          "logits that overflow their dtype); check the model's last checkpoint or train in fp32")
    return torch.searchsorted(cdf, (u.to(cdf.device) * total)[:, None], right=True).squeeze(1).to(scores.device)


def uniforms(n: int, rows: torch.Tensor, generators: Sequence[torch.Generator] | None,
             device: torch.device) -> torch.Tensor:
    """`n` float64 uniforms in [0, 1): from the global stream of `device`, or one from each row's own generator
    (`rows` maps batch rows to output rows), so that a prompt's sample does not depend on its batch."""
    if generators is None:
        return torch.rand(n, dtype=torch.float64, device=device if device.type != "mps" else "cpu")
    return torch.cat([torch.rand(1, dtype=torch.float64, generator=generators[r]) for r in rows.tolist()])


def _custom_mask_ok(model: PreTrainedModel, past) -> bool:
    """Whether decoding steps may pass a ready boolean 4-D mask over every position so far: sdpa attention in a
    model that honours custom masks, with a cache that keeps every position (a sliding window's does not)."""
    return (plain_cache(past) and getattr(model.config, "_attn_implementation", None) == "sdpa"
            and packing_supported(model))


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
