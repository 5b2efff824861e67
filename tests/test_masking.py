import torch
from transformers import GPT2Config, GPT2LMHeadModel

from prefkd.data.collate import Example, collate, encode_examples
from prefkd.logprobs import response_token_logps, selective_log_softmax, sequence_logps

EOS = 0


def test_collate_masks_prompt_and_padding_but_keeps_eos():
    ex = [Example([5, 6, 7], [8, 9, EOS]), Example([5], [EOS])]
    b = collate(ex, pad_id=EOS)  # pad == eos, as in GPT-2
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, EOS], [5, EOS, EOS, EOS, EOS, EOS]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]
    assert b["response_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 0, 0, 0, 0]]


def test_encode_examples_appends_eos_and_drops_long_prompts(tokenizer):
    ex, dropped = encode_examples(tokenizer, ["short prompt", "a much longer prompt " * 20], ["yes", "no"],
                                  max_prompt_tokens=10, max_length=32)
    assert dropped == 1 and len(ex) == 1
    assert ex[0].response_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex[0].response_ids[:-1]) == "yes"


def _model(vocab=50):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=1, n_embd=16, n_head=2, n_positions=32,
                                      eos_token_id=EOS, pad_token_id=EOS, bos_token_id=EOS)).eval()


def test_sequence_logps_match_manual_and_ignore_padding():
    model = _model()
    ex = [Example([5, 6, 7], [8, 9, EOS]), Example([11, 12], [13, EOS])]
    logps, lengths = sequence_logps(model, collate(ex, EOS))
    assert lengths.tolist() == [3, 2]
    for i, e in enumerate(ex):  # each alone, unpadded, summed by hand over the response tokens only
        ids = torch.tensor([e.prompt_ids + e.response_ids])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        n_p = len(e.prompt_ids)
        manual = sum(logp[t - 1, ids[0, t]].item() for t in range(n_p, ids.shape[1]))
        assert abs(logps[i].item() - manual) < 1e-4


def test_response_token_logps_zero_outside_mask():
    model = _model()
    b = collate([Example([5, 6], [8, EOS]), Example([5], [EOS])], EOS)
    tok, mask = response_token_logps(model, b)
    assert mask.tolist() == [[0, 1, 1], [1, 0, 0]]
    assert (tok[mask == 0] == 0).all() and (tok[mask == 1] < 0).all()


def test_selective_log_softmax_equals_full():
    logits = torch.randn(5, 7, 33)
    labels = torch.randint(0, 33, (5, 7))
    full = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(selective_log_softmax(logits, labels, chunk_elements=2 * 33), full, atol=1e-6)
