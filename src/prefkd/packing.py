"""Packed rows: sequences laid out as trees `[prompt, response 1, response 2, ...]`, several per row, with a 4-D
attention mask in which each response sees its own prompt and its own earlier tokens only, and position ids
restarting after the prompt. A prompt with K responses runs once, and no compute goes to padding; mathematically the
same as one padded forward per sequence. Used by the log-probs of training (logprobs.py) and by the sampler's
prefill (generation.py); prefix_sharing.py adds a level above the prompts (a template shared by several).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A group is a prompt and the responses that continue it; every response token is scored.
Group = tuple[list[int], list[list[int]]]


@dataclass
class Packed:
    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L]
    attention: torch.Tensor  # [R, 1, L, L] bool: query i may attend key j
    keep: torch.Tensor  # [R, L] bool: positions whose logits are needed
    kept_row: torch.Tensor  # [N] for each scored token, its row among the kept logits (row-major order of `keep`)
    labels: torch.Tensor  # [N] the scored tokens
    seq: torch.Tensor  # [N] index of the response (branch-major: branch k of group g is k * G + g)
    pos: torch.Tensor  # [N] index of the token within its response
    starts: torch.Tensor  # [G, 2] row and column where each group begins
    group: torch.Tensor  # [R, L] the group of each position, -1 = padding


def pack(groups: list[Group], pad_id: int = 0) -> Packed:
    """Lay groups out in rows (first-fit decreasing, row length = the longest group) with a tree attention mask."""
    n_groups = len(groups)
    sizes = [len(p) + sum(len(r) for r in rs) for p, rs in groups]
    width = max(max(sizes), 1)
    rows: list[list[int]] = []  # group indices per row
    room: list[int] = []
    for g in sorted(range(n_groups), key=lambda i: -sizes[i]):
        for r, free in enumerate(room):
            if sizes[g] <= free:
                rows[r].append(g)
                room[r] -= sizes[g]
                break
        else:
            rows.append([g])
            room.append(width - sizes[g])
    n_rows = len(rows)
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n_rows, width), dtype=torch.long)
    group_of = torch.full((n_rows, width), -1, dtype=torch.long)  # -1 = padding
    branch_of = torch.zeros((n_rows, width), dtype=torch.long)  # 0 = prompt, k + 1 = response k
    keep = torch.zeros((n_rows, width), dtype=torch.bool)
    starts = torch.zeros((n_groups, 2), dtype=torch.long)
    predictor: list[tuple[int, int]] = []
    labels: list[int] = []
    seq: list[int] = []
    pos: list[int] = []
    for r, members in enumerate(rows):
        col = 0
        for g in members:
            prompt, responses = groups[g]
            n_p = len(prompt)
            starts[g] = torch.tensor([r, col])
            ids[r, col: col + n_p] = torch.tensor(prompt, dtype=torch.long)
            positions[r, col: col + n_p] = torch.arange(n_p)
            group_of[r, col: col + n_p] = g
            last_prompt = col + n_p - 1
            col += n_p
            for k, resp in enumerate(responses):
                n = len(resp)
                ids[r, col: col + n] = torch.tensor(resp, dtype=torch.long)
                positions[r, col: col + n] = torch.arange(n_p, n_p + n)
                group_of[r, col: col + n] = g
                branch_of[r, col: col + n] = k + 1
                if n_p and n:  # the last prompt token predicts the first response token; without a prompt
                    predictor += [(r, last_prompt)] + [(r, c) for c in range(col, col + n - 1)]
                    labels += resp
                    seq += [k * n_groups + g] * n
                    pos += list(range(n))
                elif n > 1:  # ... the first token has nothing to predict it
                    predictor += [(r, c) for c in range(col, col + n - 1)]
                    labels += resp[1:]
                    seq += [k * n_groups + g] * (n - 1)
                    pos += list(range(1, n))
                col += n
    same_group = group_of[:, :, None] == group_of[:, None, :]
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    key_branch, query_branch = branch_of[:, None, :], branch_of[:, :, None]
    visible = same_group & causal & ((key_branch == 0) | (key_branch == query_branch))
    visible |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty softmax row
    pred = torch.tensor(predictor, dtype=torch.long).view(-1, 2)
    keep[pred[:, 0], pred[:, 1]] = True
    rank = keep.flatten().cumsum(0) - 1
    return Packed(ids, positions, visible.unsqueeze(1), keep, rank[pred[:, 0] * width + pred[:, 1]],
                  torch.tensor(labels, dtype=torch.long), torch.tensor(seq, dtype=torch.long),
                  torch.tensor(pos, dtype=torch.long), starts, group_of)


def model_config(model: torch.nn.Module):
    return getattr(getattr(model, "module", model), "config", None)  # DDP wraps the model in .module


_PROBED: dict[tuple[type, str], bool] = {}


def packing_supported(model: torch.nn.Module) -> bool:
    """Whether this kind of model computes packed rows right: it must take a custom 4-D attention mask (transformers'
    sdpa and eager attention do) and a boolean `logits_to_keep`. Checked once per model class and attention by a
    tiny probe against the plain forward; anything else uses the padded path."""
    cfg = model_config(model)
    attn = getattr(cfg, "_attn_implementation", None)
    if attn not in ("sdpa", "eager"):
        return False
    key = (type(getattr(model, "module", model)), attn)
    if key not in _PROBED:
        try:
            _PROBED[key] = _probe(model)
        except Exception:  # a model that rejects the arguments: not packable, whatever the reason
            _PROBED[key] = False
    return _PROBED[key]


def _probe(model: torch.nn.Module) -> bool:
    """Packed log-probs of a prompt with two responses and two short sequences sharing a row equal those of the
    plain forward of each sequence alone."""
    top = min(getattr(model_config(model), "vocab_size", 9), 9) - 1
    groups = [([1, 2, 3], [[4], [5, 6]]), ([5], [[6]]), ([7], [[8]])]  # widths 6, 2, 2: the last two share a row
    groups = [([t % top + 1 for t in p], [[t % top + 1 for t in r] for r in rs]) for p, rs in groups]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            packed = pack(groups)
            logits = packed_forward(model, packed, packed.keep, device).logits
            got = torch.log_softmax(logits.float(), -1)[packed.kept_row.to(device), packed.labels.to(device)]
            want = torch.zeros_like(got)
            for i, (s, j) in enumerate(zip(packed.seq.tolist(), packed.pos.tolist(), strict=True)):
                prompt, responses = groups[s % len(groups)]  # response index s = branch * groups + group
                response = responses[s // len(groups)]
                ids = torch.tensor([prompt + response], device=device)
                logits = model(input_ids=ids).logits[0, len(prompt) + j - 1]
                want[i] = torch.log_softmax(logits.float(), -1)[response[j]]
    finally:
        model.train(was_training)
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    return got.shape == (5,) and bool(((got - want).abs() <= tol).all())


def packed_forward(model: torch.nn.Module, packed: Packed, keep: torch.Tensor, device: torch.device,
                   use_cache: bool = False, cache=None):
    """The model on packed rows, logits only at the `keep` positions ([K, V], row-major order of `keep`).

    With a `cache` (a transformers `Cache` of P positions), `packed.attention` is [R, 1, L, P + L]: what each token
    sees of the past, then of its row. (`cache` is transformers' name for the past since 5.x; `past_key_values` warns
    and goes in 5.40.)"""
    mask = packed.attention.to(device)
    if model_config(model)._attn_implementation == "eager":  # eager adds the mask to the scores
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    keep = keep.to(device)
    out = model(input_ids=packed.input_ids.to(device), position_ids=packed.position_ids.to(device),
                attention_mask=mask, logits_to_keep=keep, use_cache=use_cache, cache=cache)
    if out.logits.dim() == 3:  # a model that ignores a mask in logits_to_keep
        out.logits = out.logits[keep]
    return out
