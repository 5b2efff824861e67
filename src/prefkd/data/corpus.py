"""Pretraining corpus for the LM-loss term: documents joined with EOS, cut into fixed-length token blocks."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase


def token_blocks(tokenizer: PreTrainedTokenizerBase, documents: list[str], block_size: int) -> torch.Tensor:
    """[N, block_size] token blocks of the concatenated documents (the tail shorter than a block is dropped)."""
    ids: list[int] = []
    for doc in documents:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // block_size
    if n == 0:
        raise ValueError(f"corpus has {len(ids)} tokens, fewer than one block of {block_size}")
    return torch.tensor(ids[: n * block_size]).view(n, block_size)
