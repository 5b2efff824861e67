"""Per-token and per-sequence log-probabilities of response tokens.

Position t of the logits scores token t+1; only response tokens (the EOS included) count, never prompt or pad.

Two things make this cheap (docs/benchmarks.md measures them):
- **Packing with shared prompts.** Sequences are laid out as groups `[prompt, response 1, response 2, ...]`, several
  groups per row, with a 4-D attention mask in which each response sees its own prompt and its own earlier tokens
  only, and position ids restarting after the prompt. A DPKD pair therefore runs its prompt once for both responses,
  and no compute goes to padding. Mathematically the same as one padded forward per sequence.
- **Logits only where they are scored.** The LM head runs on the positions that predict a response token
  (`logits_to_keep`), and the log-softmax is taken in chunks of positions: a full `[B, T, V]` log-softmax is never
  materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefkd.data.chat import Renderer, text_ids
from prefkd.data.collate import Example, collate

# Logits per chunk of the log-softmax: 4M floats (16 MiB in fp32) bounds the extra memory at any vocabulary size.
CHUNK_ELEMENTS = 1 << 22


def _chunk_positions(vocab: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(1, vocab))


def logsumexp_rows(logits: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """logsumexp over the last dim of `[N, V]` logits, in fp32, a chunk of positions at a time."""
    step = _chunk_positions(logits.shape[-1], chunk_elements)
    if logits.shape[0] <= step:
        return torch.logsumexp(logits.float(), dim=-1)
    return torch.cat([torch.logsumexp(logits[s: s + step].float(), dim=-1) for s in range(0, logits.shape[0], step)])


def log_softmax_at(logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor,
                   chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """`log_softmax(logits[rows])[labels]` in fp32 for `[K, V]` logits, a chunk of rows at a time (rows may repeat).

    Without autograd each chunk goes through `torch.log_softmax`, the same kernel row by row as one full call, so
    the values equal the full computation exactly. With autograd it is `logit - logsumexp`, whose backward keeps
    no `[K, V]` log-softmax (only the logits, which exist anyway); it is as exact (closer to float64, in fact).
    """
    if logits.requires_grad and torch.is_grad_enabled():
        return logits[rows, labels].float() - logsumexp_rows(logits, chunk_elements)[rows]
    step = _chunk_positions(logits.shape[-1], chunk_elements)
    out = torch.empty(rows.shape, dtype=torch.float32, device=logits.device)
    for s in range(0, logits.shape[0], step):
        sel = (rows >= s) & (rows < s + step)
        if sel.any():
            out[sel] = torch.log_softmax(logits[s: s + step].float(), dim=-1)[rows[sel] - s, labels[sel]]
    return out


def selective_log_softmax(logits: torch.Tensor, labels: torch.Tensor,
                          chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """log softmax(logits)[..., labels] in fp32 without materialising the full log-softmax.

    Positions (all leading dims flattened) are processed in chunks of about `chunk_elements` logits, so the extra
    memory is one chunk whatever the batch and sequence length.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    rows = torch.arange(flat.shape[0], device=flat.device)
    return log_softmax_at(flat, rows, labels.reshape(-1), chunk_elements).view(labels.shape)


# ---- packing ---------------------------------------------------------------------------------------------------

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
                  torch.tensor(pos, dtype=torch.long), starts)


def _config(model: torch.nn.Module):
    return getattr(getattr(model, "module", model), "config", None)  # DDP wraps the model in .module


_PROBED: dict[tuple[type, str], bool] = {}


def packing_supported(model: torch.nn.Module) -> bool:
    """Whether this kind of model computes packed rows right: it must take a custom 4-D attention mask (transformers'
    sdpa and eager attention do) and a boolean `logits_to_keep`. Checked once per model class and attention by a
    tiny probe against the plain forward; anything else uses the padded path."""
    cfg = _config(model)
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
    top = min(getattr(_config(model), "vocab_size", 9), 9) - 1
    groups = [([1, 2, 3], [[4], [5, 6]]), ([5], [[6]]), ([7], [[8]])]  # widths 6, 2, 2: the last two share a row
    groups = [([t % top + 1 for t in p], [[t % top + 1 for t in r] for r in rs]) for p, rs in groups]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            packed = pack(groups)
            got = log_softmax_at(packed_forward(model, packed, packed.keep, device).logits,
                                 packed.kept_row.to(device), packed.labels.to(device))
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
    if _config(model)._attn_implementation == "eager":  # eager adds the mask to the scores
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    keep = keep.to(device)
    out = model(input_ids=packed.input_ids.to(device), position_ids=packed.position_ids.to(device),
                attention_mask=mask, logits_to_keep=keep, use_cache=use_cache, cache=cache)
    if out.logits.dim() == 3:  # a model that ignores a mask in logits_to_keep
        out.logits = out.logits[keep]
    return out


def packed_token_logps(model: torch.nn.Module, groups: list[Group], device: torch.device | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-prob, response index, position) of every response token of `groups`, from one packed forward."""
    device = device or next(model.parameters()).device
    packed = pack(groups)
    if packed.labels.numel() == 0:
        zero = next(model.parameters()).new_zeros(0, dtype=torch.float32)
        return zero, packed.seq, packed.pos
    logits = packed_forward(model, packed, packed.keep, device).logits
    logps = log_softmax_at(logits, packed.kept_row.to(device), packed.labels.to(device))
    return logps, packed.seq.to(device), packed.pos.to(device)


def group_token_logps(model: torch.nn.Module, prompts: list[list[int]], branches: list[list[list[int]]],
                      device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs `[K * B, C]` and mask of K responses per prompt, each prompt computed once.

    `branches[k][i]` is response k of prompt i; rows come branch-major (all of branch 0, then branch 1, ...), the
    layout a concatenated `[chosen; rejected]` batch has. Models whose attention takes no custom mask fall back to
    one padded forward per branch."""
    b, k = len(prompts), len(branches)
    width = max([len(r) for rs in branches for r in rs] + [1])
    if not packing_supported(model):
        return _padded_branch_logps(model, prompts, branches, width, device)
    logps, seq, pos = packed_token_logps(model, [(p, [rs[i] for rs in branches]) for i, p in enumerate(prompts)],
                                         device)
    out = logps.new_zeros((k * b, width)).index_put((seq, pos), logps)
    mask = torch.zeros((k * b, width), dtype=torch.float32, device=out.device)
    for j, rs in enumerate(branches):
        for i, r in enumerate(rs):
            mask[j * b + i, : len(r)] = 1
    return out, mask


def _padded_branch_logps(model, prompts, branches, width, device):
    examples = [Example(p, r) for rs in branches for p, r in zip(prompts, rs, strict=True)]
    batch = {key: v.to(device or next(model.parameters()).device) for key, v in collate(examples, 0).items()}
    tok, mask = _padded_response_token_logps(model, batch)
    out = tok.new_zeros((len(examples), width))
    out_mask = torch.zeros_like(out)
    for i, e in enumerate(examples):
        start = len(e.prompt_ids) - 1
        out[i, : len(e.response_ids)] = tok[i, start: start + len(e.response_ids)]
        out_mask[i, : len(e.response_ids)] = mask[i, start: start + len(e.response_ids)]
    return out, out_mask


def _batch_groups(batch: dict[str, torch.Tensor]) -> list[Group] | None:
    """Each row of a collated batch as (prompt, [response]); None when a row's response is not its tail."""
    groups = []
    lengths = batch["attention_mask"].sum(-1).tolist()
    for ids, resp, n in zip(batch["input_ids"].tolist(), batch["response_mask"].tolist(), lengths, strict=True):
        first = resp.index(1) if 1 in resp else n
        if any(resp[:first]) or not all(resp[first:n]) or any(resp[n:]):
            return None
        first = max(first, 1)  # position 0 has nothing before it: never scored
        groups.append((ids[:first], [ids[first:n]]))
    return groups


def response_token_logps(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token log-probs [B, T-1], mask [B, T-1]) of the response tokens of a collated batch."""
    mask = batch["response_mask"][:, 1:].to(torch.float32)
    groups = _batch_groups(batch) if packing_supported(model) else None
    if groups is None:
        return _padded_response_token_logps(model, batch)
    logps, seq, pos = packed_token_logps(model, groups, batch["input_ids"].device)
    offsets = torch.tensor([len(p) - 1 for p, _ in groups], dtype=torch.long, device=seq.device)
    out = logps.new_zeros(mask.shape).index_put((seq, pos + offsets[seq]), logps)
    return out, mask.to(out.device)


def _padded_response_token_logps(model, batch):
    """The reference computation: one padded forward, logits on every position."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["input_ids"][:, 1:]
    mask = batch["response_mask"][:, 1:].to(torch.float32)
    return selective_log_softmax(logits, labels) * mask, mask


def sequence_logps(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed response log-prob [B], response length [B])."""
    token_logps, mask = response_token_logps(model, batch)
    return token_logps.sum(-1), mask.sum(-1)


def token_mean_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over every counted token of the batch (the one place it is normalised)."""
    return -(token_logps * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def text_logprobs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                  responses: list[str], batch_size: int = 16, end_ids: list[int] | None = None) -> torch.Tensor:
    """log p(response + end token | prompt) of each pair, summed over the response's tokens, as float32 [n] on the
    CPU: the probability a model gives a text, whatever its tokenizer.

    Prompt and response are tokenised separately, as training does: the prompt is rendered text (its template's
    special tokens are tokens; the tokenizer's own BOS is added when it adds one and the text lacks it), the response
    plain text (`text_ids`), followed by the model's end token (`end_ids`; default: the end-of-turn token of the
    tokenizer's chat template, else its EOS). This is the log-prob of the tokenizer's own tokenization of the text,
    a lower bound on the text's probability (which sums over every tokenization), tight for trained models."""
    renderer = Renderer(tokenizer)
    end = renderer.end_ids if end_ids is None else end_ids
    examples = [Example(renderer.with_bos(tokenizer(p, add_special_tokens=False)["input_ids"]), text_ids(tokenizer, r)
                        + end) for p, r in zip(prompts, responses, strict=True)]
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start: start + batch_size], tokenizer.pad_token_id or 0)
        sums, _ = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})
        out.append(sums.float().cpu())
    return torch.cat(out) if out else torch.zeros(0)
