"""prefkd.packing: the layout of packed rows (groups side by side, the tree mask, the kept positions). That a
packed forward equals the plain one is tested with the log-probs (test_logprobs.py, test_prefix_sharing.py)."""

from prefkd.packing import pack


def test_pack_shares_the_prompt_and_hides_one_response_from_the_other():
    p = pack([([5, 6, 7], [[8, 9], [10]]), ([11], [[12, 13, 14]])])
    # Width = the longest group (3 + 2 + 1); the second group (4 tokens) does not fit beside it: two rows.
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 3, 0, 0]]  # response 2 restarts after the prompt
    att = p.attention[:, 0]
    assert att[0, 5].tolist() == [True, True, True, False, False, True]  # 10 sees the prompt and itself, not 8, 9
    assert att[0, 4].tolist() == [True, True, True, True, True, False]
    assert not att[1, :4, 4:].any()  # real tokens never see padding
    # Logits are kept only where a response token is predicted; the last prompt token predicts 8 and 10.
    assert p.keep.nonzero().tolist() == [[0, 2], [0, 3], [1, 0], [1, 1], [1, 2]]
    assert p.labels.tolist() == [8, 9, 10, 12, 13, 14]
    assert p.kept_row.tolist() == [0, 1, 0, 2, 3, 4]
    assert p.seq.tolist() == [0, 0, 2, 1, 1, 1]  # branch-major: branch k of group g is k * 2 + g
    assert p.pos.tolist() == [0, 1, 0, 0, 1, 2]
    assert p.group.tolist() == [[0, 0, 0, 0, 0, 0], [1, 1, 1, 1, -1, -1]]  # -1: padding


def test_pack_puts_small_groups_side_by_side_without_seeing_each_other():
    p = pack([([1, 2], [[3]]), ([4], [[5]]), ([6, 7, 8, 9], [[1]])])
    assert p.input_ids.tolist() == [[6, 7, 8, 9, 1], [1, 2, 3, 4, 5]]
    assert p.position_ids[1].tolist() == [0, 1, 2, 0, 1]
    assert not p.attention[1, 0, 3:, :3].any() and p.attention[1, 0, 4, 3]
