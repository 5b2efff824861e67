import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from prefkd import generation
from prefkd.generation import SamplingConfig, _decode, draw, left_padded, sample_responses, uniforms
from prefkd.logprobs import packing_supported

EOS = 0


@pytest.fixture
def multinomial_draw(monkeypatch):
    """Draws as `generate` does (`torch.multinomial` on the global stream), so that a sampled continuation can be
    compared token for token with `generate`'s: everything before the draw (processors, positions, the cache, the
    packed prefill) must then give the same tokens. prefkd's own draw is tested against a float64 brute force."""
    monkeypatch.setattr(generation, "uniforms", lambda *args: None)
    monkeypatch.setattr(generation, "draw", lambda scores, u: torch.multinomial(scores.softmax(-1), 1).squeeze(1))


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


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=32, max_position_embeddings=64))


UNREACHABLE = 999  # an EOS that is never sampled, so no row leaves early and generate's random stream is matched


@pytest.mark.parametrize("make", [_model, _llama])
@pytest.mark.parametrize("cfg", [SamplingConfig(temperature=0, max_new_tokens=10),
                                 SamplingConfig(temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=10,
                                                no_repeat_ngram_size=2),
                                 SamplingConfig(max_new_tokens=10)])
def test_decoding_samples_exactly_what_generate_samples(make, cfg, multinomial_draw):
    model = make().eval()
    ids = torch.tensor([[EOS, EOS, 5, 6, 7], [EOS, 8, 9, 10, 11], [1, 2, 3, 4, 5]])
    attn = (torch.arange(5)[None] >= torch.tensor([[2], [1], [0]])).long()
    torch.manual_seed(1)
    ours = _decode(model, ids, attn, cfg, UNREACHABLE)
    torch.manual_seed(1)  # the prompts run packed, their keys and values are then laid out left-padded
    ours_packed = _decode(model, ids, attn, cfg, UNREACHABLE, prompts=[[5, 6, 7], [8, 9, 10, 11], [1, 2, 3, 4, 5]])
    torch.manual_seed(1)
    mode = dict(do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p) \
        if cfg.temperature > 0 else dict(do_sample=False)
    theirs = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=10, pad_token_id=EOS,
                            eos_token_id=UNREACHABLE, no_repeat_ngram_size=cfg.no_repeat_ngram_size, **mode)
    assert ours == ours_packed == theirs[:, 5:].tolist()


def test_a_row_leaves_the_batch_at_its_eos():
    model = _model()
    with torch.no_grad():
        model.lm_head.weight[EOS] += 3.0
    shapes = []
    model.transformer.wte.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape[:2])))
    out = sample_responses(model, [[5, 6], [7, 8, 9], [10], [11, 12]], SamplingConfig(max_new_tokens=12, batch_size=4),
                           EOS, EOS, seed=0)
    lengths = sorted(len(r) for r in out)
    prefill = [s for s in shapes if s[1] > 1]
    steps = [rows for rows, width in shapes if width == 1]
    # The 4 prompts packed in 3 rows ([7 8 9], [5 6 10], [11 12]), run in groups cut to their width; then per step
    # only the rows still running.
    assert sorted(prefill) == [(1, 2), (2, 3)]
    assert steps == [sum(n > t for n in lengths) for t in range(1, max(lengths))]


TEMPLATE = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3]  # 18 tokens: prompts sharing it run it once
OTHER = TEMPLATE[:6] + [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]  # another template, 6 tokens in common


def test_shared_prefixes_find_templates_and_leave_each_prompt_a_token():
    from prefkd.prefix_sharing import shared_prefixes

    prompts = [TEMPLATE + [10, 11], OTHER + [12], TEMPLATE + [10, 12, 13], [7, 7], TEMPLATE, OTHER + [13, 14]]
    groups = sorted(shared_prefixes(prompts))
    # TEMPLATE alone keeps its last token; the two OTHER prompts share all of OTHER; [7, 7] shares nothing.
    assert groups == [(17, [4, 0, 2]), (18, [1, 5])]


def _eager():
    model = _model()
    model.config._attn_implementation = "eager"  # adds the mask to the scores: the packed path converts it
    return model


@pytest.mark.parametrize("make", [_model, _llama, _eager])
@pytest.mark.parametrize("cfg", [SamplingConfig(temperature=0, max_new_tokens=8), SamplingConfig(max_new_tokens=8)])
def test_prompts_sharing_a_template_sample_exactly_what_generate_samples(make, cfg, multinomial_draw):
    model = make().eval()
    prompts = [TEMPLATE + [10, 11], OTHER + [12], TEMPLATE + [10, 12, 13], [7, 7, 8], TEMPLATE, OTHER + [13, 14]]
    ids, attn = left_padded(prompts, EOS)
    assert packing_supported(model)  # (its probe runs the model once per kind: before the count below)
    forwards = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: forwards.append(tuple(out.shape[:2])))
    torch.manual_seed(1)
    ours = _decode(model, ids, attn, cfg, UNREACHABLE, prompts=prompts)
    # The two templates (17 and 18 tokens) run once, then the prompts' own 14 tokens (packed), then the steps.
    own = [(r, w) for r, w in forwards[1:] if w > 1]
    assert forwards[0] == (2, 18) and sum(r * w for r, w in own) <= 16 < sum(map(len, prompts))
    torch.manual_seed(1)
    mode = dict(do_sample=True, top_k=0) if cfg.temperature > 0 else dict(do_sample=False)
    theirs = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=8, pad_token_id=EOS,
                            eos_token_id=UNREACHABLE, **mode)
    assert ours == theirs[:, ids.shape[1]:].tolist()


def test_a_model_whose_cache_is_not_plain_falls_back_to_one_padded_prefill(multinomial_draw):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)  # a sliding window: its cache layers are not plain keys and values
    model = MistralForCausalLM(MistralConfig(vocab_size=40, num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                             num_key_value_heads=1, intermediate_size=32, max_position_embeddings=64,
                                             sliding_window=8)).eval()
    prompts = [TEMPLATE + [10, 11], TEMPLATE + [12], [7, 7, 8]]
    ids, attn = left_padded(prompts, EOS)
    cfg = SamplingConfig(max_new_tokens=8)
    torch.manual_seed(1)
    ours = _decode(model, ids, attn, cfg, UNREACHABLE, prompts=prompts)
    torch.manual_seed(1)
    theirs = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=8, pad_token_id=EOS,
                            eos_token_id=UNREACHABLE, do_sample=True, top_k=0)
    assert ours == theirs[:, ids.shape[1]:].tolist()


def _first_above(probs: list[float], u: float) -> int:
    """The inverse-CDF draw by hand: the first token whose float64 running sum exceeds u * total."""
    total = sum(probs)
    running = 0.0
    for i, p in enumerate(probs):
        running += p
        if running > u * total:
            return i
    raise AssertionError("u * total must stay below the total")


def test_the_draw_picks_the_token_whose_cumulative_share_holds_u():
    torch.manual_seed(0)
    scores = torch.randn(6, 300) * 3
    scores[:, ::7] = float("-inf")  # top-k / top-p leave tokens at probability 0
    scores[1, :-1] = float("-inf")  # one token left: always it
    scores[2, 2:] = float("-inf")  # (and token 0, every 7th): token 1 only
    u = torch.tensor([0.0, 0.37, 0.5, 0.999, 1 - 2**-53, 0.123456789], dtype=torch.float64)
    for trial in range(20):
        if trial:
            u = torch.rand(6, dtype=torch.float64)
        got = draw(scores, u).tolist()
        probs = scores.softmax(-1).double()
        want = [_first_above(probs[r].tolist(), float(u[r])) for r in range(6)]
        assert got == want
        assert all(probs[r, t] > 0 for r, t in enumerate(got))
    assert got[1] == 299 and got[2] == 1


def test_the_draw_samples_the_softmax_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 0.0, -1.0, float("-inf"), 1.0, -4.0])
    n = 200_000
    counts = torch.bincount(draw(logits.expand(n, -1), torch.rand(n, dtype=torch.float64)), minlength=6)
    expected = logits.softmax(-1).double() * n
    assert counts[3] == 0
    live = expected > 0
    # chi-square with 4 degrees of freedom: its 0.999 quantile is 18.47
    assert float(((counts[live] - expected[live]) ** 2 / expected[live]).sum()) < 18.47


def test_a_nan_in_the_scores_is_refused_clearly():
    from prefkd.errors import PrefkdError

    scores = torch.zeros(2, 5)
    scores[1, 2] = float("nan")
    with pytest.raises(PrefkdError, match="NaN or inf"):
        draw(scores, torch.rand(2, dtype=torch.float64))


def test_each_row_draws_from_its_own_generator():
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    u = uniforms(2, torch.tensor([2, 0]), gens, torch.device("cpu"))
    assert u.tolist() == [torch.rand(1, dtype=torch.float64, generator=torch.Generator().manual_seed(s)).item()
                          for s in (7, 5)]
