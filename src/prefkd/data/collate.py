"""Prompt and response ids as examples: pad, and mark which tokens are scored.

The response mask comes from lengths, never from comparing with the pad id, so a GPT-2 style tokenizer
(pad == eos) keeps the real EOS in the loss and drops only the padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]
    response_ids: list[int]  # ends with an end token unless a sample hit the length limit
    # Pairs (PLaD): the rejected response and the scores of both against the reference.
    rejected_ids: list[int] = field(default_factory=list)
    chosen_score: float = 0.0
    rejected_score: float = 0.0
    index: int = -1  # position in the run's prompt list (keys the teacher cache of dpkd's cached mode)
    prompt_mask: list[int] = field(default_factory=list)  # 1 on prompt tokens also trained on (earlier assistant
    # turns of a conversation in multi-turn SFT); empty: none
    # The same example in the teacher's tokens and the response's text (uld, which reads it in both tokenizers).
    text: str = ""
    teacher_prompt_ids: list[int] = field(default_factory=list)
    teacher_response_ids: list[int] = field(default_factory=list)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    """Plain text to ids, without the tokenizer's own special tokens (rendered prompts: `data.chat.Renderer`)."""
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def encode_examples(prompt_ids: list[list[int]], response_ids: list[list[int]], max_prompt_tokens: int = 256,
                    max_length: int = 512, prompt_masks: list[list[int]] | None = None) -> tuple[list[Example], int]:
    """Examples of (prompt, response + end token) ids; pairs over the limits are dropped (as MiniLLM/DPKD do),
    count returned."""
    masks = prompt_masks or [[] for _ in prompt_ids]
    out, dropped = [], 0
    for p, r, m in zip(prompt_ids, response_ids, masks, strict=True):
        if len(p) > max_prompt_tokens or len(p) + len(r) > max_length:
            dropped += 1
            continue
        out.append(Example(p, r, prompt_mask=m if any(m) else []))
    return out, dropped


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `response_mask` ([B, T], 1 on response tokens + end token,
    and on prompt tokens an example's `prompt_mask` marks)."""
    width = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    resp = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n_p, n = len(e.prompt_ids), len(e.prompt_ids) + len(e.response_ids)
        ids[i, :n] = torch.tensor(e.prompt_ids + e.response_ids)
        attn[i, :n] = 1
        resp[i, n_p:n] = 1
        if e.prompt_mask:
            resp[i, :n_p] = torch.tensor(e.prompt_mask)
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}
