"""prefkd.data.collate: prompt tokens and padding are masked out of the loss, the response's EOS is kept."""

from prefkd.data.collate import Example, collate, encode_examples

EOS = 0


def test_collate_masks_prompt_and_padding_but_keeps_eos():
    ex = [Example([5, 6, 7], [8, 9, EOS]), Example([5], [EOS])]
    b = collate(ex, pad_id=EOS)  # pad == eos, as in GPT-2
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, EOS], [5, EOS, EOS, EOS, EOS, EOS]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]
    assert b["response_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 0, 0, 0, 0]]


def test_encode_examples_drops_pairs_over_the_limits():
    ex, dropped = encode_examples([[1, 2], [1] * 11, [3] * 5], [[4, EOS], [4, EOS], [5] * 4],
                                  max_prompt_tokens=10, max_length=8)
    assert dropped == 2 and [(e.prompt_ids, e.response_ids) for e in ex] == [([1, 2], [4, EOS])]


def test_prompt_mask_marks_earlier_assistant_turns_for_the_loss():
    ex, _ = encode_examples([[5, 6, 7, 8]], [[9, EOS]], prompt_masks=[[0, 1, 1, 0]])
    b = collate(ex + [Example([5], [EOS])], pad_id=EOS)
    assert b["response_mask"].tolist() == [[0, 1, 1, 0, 1, 1], [0, 1, 0, 0, 0, 0]]
