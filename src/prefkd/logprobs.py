"""Per-token and per-sequence log-probabilities of response tokens.

Position t of the logits scores token t+1; only response tokens (the EOS included) count, never prompt or pad.

Three things make this cheap (docs/benchmarks.md measures them):
- **Packing with shared prompts** (packing.py). Sequences are laid out as groups `[prompt, response 1, response 2,
  ...]`, several groups per row, with a 4-D attention mask in which each response sees its own prompt and its own
  earlier tokens only, and position ids restarting after the prompt. A DPKD pair therefore runs its prompt once for
  both responses, and no compute goes to padding. Mathematically the same as one padded forward per sequence.
- **Shared templates** (prefix_sharing.py). Prompts that begin with the same template (16 tokens or more) run it
  once per batch, as the past of their own tokens: a template -> prompt -> responses tree, the same computation.
- **Logits only where they are scored.** The LM head runs on the positions that predict a response token
  (`logits_to_keep`), and the log-softmax is taken in chunks of positions: a full `[B, T, V]` log-softmax is never
  materialised.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefkd.data.chat import Renderer, text_ids
from prefkd.data.collate import Example, collate
from prefkd.packing import Group, pack, packed_forward, packing_supported
from prefkd.prefix_sharing import shared_prefix_logits, sharing_applies

# Logits per chunk of the log-softmax: 4M floats (16 MiB in fp32) bounds the extra memory at any vocabulary size.
CHUNK_ELEMENTS = 1 << 22


def _chunk_positions(vocab: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(1, vocab))


def logsumexp_rows(logits: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """logsumexp over the last dim of `[N, V]` logits, in fp32, a chunk of positions at a time."""
    step = _chunk_positions(logits.shape[-1], chunk_elements)
    if logits.shape[0] <= step:
        return torch.logsumexp(logits.float(), dim=-1)
    # split, not slices in a loop: each slice's backward would build a zero gradient of the whole [N, V] and add
    # it up, chunks x N x V work (6.1 s instead of 0.8 s forward + backward at 1,808 positions x 50,257:
    # bench/chunked_logsumexp.py); split's backward writes every chunk's gradient into one tensor.
    return torch.cat([torch.logsumexp(chunk.float(), dim=-1) for chunk in logits.split(step)])


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


def packed_token_logps(model: torch.nn.Module, groups: list[Group], device: torch.device | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-prob, response index, position) of every response token of `groups`, from one packed forward (two where
    prompts share a template: `prefix_sharing`)."""
    device = device or next(model.parameters()).device
    done = shared_prefix_logits(model, groups, device) if sharing_applies(model) else None
    if done is not None:
        logits, packed = done  # the same responses and tokens, laid out after the shared prefixes
    else:
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
