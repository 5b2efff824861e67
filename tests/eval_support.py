"""Small local models for the evaluation, judge and analysis tests (nothing from the hub)."""

from pathlib import Path

import torch
from tokenizers import BertWordPieceTokenizer
from tokenizers.processors import BertProcessing
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    PreTrainedTokenizerFast,
)

from prefkd.models import build_model, save_pretrained


def save_lm(path: Path, tokenizer, size: str = "nano", seed: int = 0, max_positions: int = 128) -> str:
    save_pretrained(build_model("gpt2", size, tokenizer, max_positions, seed), tokenizer, path)
    return str(path)


def save_gpt2_reward_model(path: Path, tokenizer, seed: int = 0) -> str:
    """A GPT-2 sequence classifier with one output (the reward), saved with the BPE tokenizer."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=128, num_labels=1,
                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                     bos_token_id=tokenizer.bos_token_id)
    model = GPT2ForSequenceClassification(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def save_bert_reward_model(path: Path, texts: list[str], seed: int = 0) -> str:
    """An encoder reward model with a locally trained WordPiece tokenizer: text pairs become [CLS] q [SEP] a [SEP],
    as with DeBERTa reward models."""
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(texts, vocab_size=300, min_frequency=1, show_progress=False)
    wp.post_processor = BertProcessing(("[SEP]", wp.token_to_id("[SEP]")), ("[CLS]", wp.token_to_id("[CLS]")))
    tok = PreTrainedTokenizerFast(tokenizer_object=wp._tokenizer, unk_token="[UNK]", sep_token="[SEP]",
                                  pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]", model_max_length=64)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=1,
                     pad_token_id=tok.pad_token_id)
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
