"""prefkd.data.collate: prompt tokens and padding are masked out of the loss, the response's EOS is kept."""

from prefkd.data.collate import Example, collate, encode_examples

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
