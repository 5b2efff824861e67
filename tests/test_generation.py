import torch
from transformers import GPT2Config, GPT2LMHeadModel

from prefkd.generation import SamplingConfig, sample_responses

EOS = 0


def _model():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_layer=1, n_embd=16, n_head=2, n_positions=64,
                                      eos_token_id=EOS, pad_token_id=EOS, bos_token_id=EOS))


def test_left_padded_batch_equals_one_prompt_at_a_time():
    model = _model()
    prompts = [[5, 6, 7, 8, 9], [11, 12], [13]]
    greedy = SamplingConfig(temperature=0, max_new_tokens=6, batch_size=8)
    batched = sample_responses(model, prompts, greedy, EOS, EOS)
    alone = [sample_responses(model, [p], greedy, EOS, EOS)[0] for p in prompts]
    assert batched == alone


def test_responses_cut_after_first_eos_and_sampling_is_seeded():
    model = _model()
    with torch.no_grad():
        model.lm_head.weight[EOS] += 3.0  # make EOS likely so the cut is exercised
    cfg = SamplingConfig(temperature=1.0, top_k=0, max_new_tokens=12, batch_size=2)
    prompts = [[5, 6], [7, 8, 9], [10]]
    a = sample_responses(model, prompts, cfg, EOS, EOS, seed=3)
    b = sample_responses(model, prompts, cfg, EOS, EOS, seed=3)
    assert a == b
    for r in a:
        assert 1 <= len(r) <= 12
        assert EOS not in r[:-1]
    assert any(r[-1] == EOS for r in a)


def test_prompts_longer_than_the_context_are_cut_from_the_left():
    model = _model()  # 64 positions
    long = list(range(1, 40)) * 2  # 78 tokens
    cfg = SamplingConfig(temperature=0, max_new_tokens=8, batch_size=2)
    out = sample_responses(model, [long, [5, 6]], cfg, EOS, EOS)
    assert out[0] == sample_responses(model, [long[-56:]], cfg, EOS, EOS)[0]
