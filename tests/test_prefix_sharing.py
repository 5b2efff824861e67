"""prefkd.prefix_sharing in the training forwards: prompts sharing a template run it once (a template -> prompt ->
responses tree), with the same log-probs and gradients as the plain computation within float32 rounding; where
nothing is shared, or the model cannot take a past, the plain packed forward runs."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import prefkd.logprobs as lp
from prefkd.data.collate import Example, collate
from prefkd.generation import SamplingConfig
from prefkd.logprobs import group_token_logps, packed_token_logps, response_token_logps
from prefkd.methods import MethodConfig, StepInputs
from prefkd.methods.dpkd import DPKDConfig, dpkd_pair_loss, pair_step, teacher_logps
from prefkd.prefix_sharing import MIN_SHARE, find_shared, prefix_sharing, shared_prefix_logits, sharing_applies

VOCAB = 97
CPU = torch.device("cpu")
TEMPLATE = [(7 * i) % 90 + 3 for i in range(20)]  # 20 tokens that every templated prompt begins with
OTHER = TEMPLATE[:5] + [(11 * i) % 90 + 2 for i in range(17)]  # a second template: 22 tokens, 5 in common


def _model(arch: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=4, n_positions=96,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                           eos_token_id=0, pad_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, num_hidden_layers=2, hidden_size=32,
                                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                             max_position_embeddings=96, bos_token_id=0, eos_token_id=0,
                                             pad_token_id=0))
    model.config._attn_implementation = attn
    return model


def _ids(g: torch.Generator, lo: int, hi: int) -> list[int]:
    return torch.randint(1, VOCAB, (int(torch.randint(lo, hi, (), generator=g)),), generator=g).tolist()


def _templated(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts of both templates plus one of neither, each with its own 1-11 tokens."""
    g = torch.Generator().manual_seed(seed)
    heads = [TEMPLATE, OTHER, []]
    return [heads[i % 3] + _ids(g, 1, 12) for i in range(n)]


def _responses(prompts: list[list[int]], k: int, seed: int = 1, empty: bool = False) -> list[list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = [[_ids(g, 1, 9) for _ in prompts] for _ in range(k)]
    if empty:
        out[-1][0] = []
    return out


def _grads(model, value):
    return torch.autograd.grad(value, list(model.parameters()))


def _assert_close_grads(model, a, b):
    for ga, gb in zip(_grads(model, a), _grads(model, b), strict=True):
        assert (ga - gb).abs().max() <= 1e-5 * max(1.0, gb.abs().max().item())


class _Forwards:
    """(rows, width) of every forward through the model's input embeddings, after the probes (once per kind)."""

    def __init__(self, model):
        sharing_applies(model)
        self.shapes: list[tuple[int, int]] = []
        model.get_input_embeddings().register_forward_hook(lambda m, a, out: self.shapes.append(tuple(out.shape[:2])))


def test_find_shared_lays_the_templates_out_one_after_another():
    prompts = _templated(6)
    found = find_shared(prompts)
    # Prompts 0 and 3 share TEMPLATE, 1 and 4 OTHER (5 tokens in common are too few to join them); 2 and 5 nothing.
    assert sorted(map(len, found.prefixes)) == [20, 22] and found.prefixes[0] in (TEMPLATE, OTHER)
    assert found.shared.tolist() == [20, 22, 0, 20, 22, 0]
    assert sorted(set(found.past_at[[0, 1]].tolist())) == [0, len(found.prefixes[0])]
    assert find_shared([TEMPLATE + [1], OTHER + [2]]) is None and find_shared([TEMPLATE + [1]]) is None
    assert MIN_SHARE == 16


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("k", [1, 3])
def test_shared_templates_give_the_padded_log_probs_and_gradients(arch, attn, k):
    model = _model(arch, attn)
    prompts = _templated(7)
    branches = _responses(prompts, k, empty=k > 1)
    forwards = _Forwards(model)
    tok, mask = group_token_logps(model, prompts, branches)
    # Two forwards: the two templates once (a row each), then the rest, packed.
    assert len(forwards.shapes) == 2 and forwards.shapes[0] == (2, 22)
    with prefix_sharing(False):
        plain, plain_mask = group_token_logps(model, prompts, branches)
    assert len(forwards.shapes) == 3  # the plain packed forward: one
    padded, padded_mask = lp._padded_branch_logps(model, prompts, branches, tok.shape[1], CPU)
    assert torch.equal(mask, padded_mask) and torch.equal(mask, plain_mask)
    assert (tok - padded).abs().max() <= 1e-5 and (tok - plain).abs().max() <= 1e-5
    weights = torch.randn(tok.shape, generator=torch.Generator().manual_seed(3))
    _assert_close_grads(model, (tok * weights).sum(), (padded * weights).sum())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sft_batches_of_templated_prompts_share_too(arch):
    model = _model(arch)
    prompts = _templated(6, seed=4)
    examples = [Example(p, r) for p, r in zip(prompts, _responses(prompts, 1, seed=5)[0], strict=True)]
    batch = collate(examples, 0)
    forwards = _Forwards(model)
    tok, mask = response_token_logps(model, batch)
    assert len(forwards.shapes) == 2
    padded, padded_mask = lp._padded_response_token_logps(model, batch)
    assert torch.equal(mask, padded_mask) and (tok - padded).abs().max() <= 1e-5
    weights = torch.randn(tok.shape, generator=torch.Generator().manual_seed(6))
    _assert_close_grads(model, (tok * weights).sum(), (padded * weights).sum())


@pytest.mark.parametrize("prompts", [[TEMPLATE + [5]], [TEMPLATE[:10] + [5, 6], TEMPLATE[:10] + [7]], [[3], [4, 5]]],
                         ids=["one prompt", "too short a template", "nothing shared"])
def test_without_a_shared_template_one_plain_packed_forward_runs(prompts):
    model = _model("gpt2")
    branches = _responses(prompts, 2, seed=7)
    forwards = _Forwards(model)
    tok, _ = group_token_logps(model, prompts, branches)
    with prefix_sharing(False):
        plain, _ = group_token_logps(model, prompts, branches)
    assert len(forwards.shapes) == 2 and torch.equal(tok, plain)  # one forward each, the same one


def test_a_template_that_is_a_whole_prompt_leaves_it_a_token_of_its_own():
    model = _model("llama")
    prompts = [TEMPLATE, TEMPLATE + [4, 5], TEMPLATE[:-1] + [6]]
    branches = [[[8, 9], [10], [11, 12, 13]]]
    assert find_shared(prompts).shared.tolist() == [19, 19, 19]
    tok, _ = group_token_logps(model, prompts, branches)
    padded, _ = lp._padded_branch_logps(model, prompts, branches, tok.shape[1], CPU)
    assert (tok - padded).abs().max() <= 1e-5


def test_responses_that_score_nothing_skip_every_forward():
    model = _model("gpt2")
    forwards = _Forwards(model)
    logps, seq, pos = packed_token_logps(model, [(TEMPLATE + [1], [[]]), (TEMPLATE + [2], [[]])])
    assert logps.numel() == seq.numel() == pos.numel() == 0 and forwards.shapes == []


def test_dropout_and_activation_checkpointing_in_training_turn_sharing_off():
    model = _model("gpt2")
    assert sharing_applies(model.train())
    with prefix_sharing(False):
        assert not sharing_applies(model)
    dropped = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_layer=1, n_embd=16, n_head=2, n_positions=64))
    dropped.config._attn_implementation = "sdpa"
    assert not sharing_applies(dropped.train()) and sharing_applies(dropped.eval())  # eval: dropout does nothing
    model.activation_checkpointing_enable()
    assert not sharing_applies(model.train()) and sharing_applies(model.eval())


def test_a_sliding_window_cache_is_not_shared():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, num_hidden_layers=1, hidden_size=16,
                                             num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                                             max_position_embeddings=96, sliding_window=8)).eval()
    groups = [(TEMPLATE + [4], [[5, 6]]), (TEMPLATE + [7], [[8]])]
    assert shared_prefix_logits(model, groups, CPU) is None


class _IgnoresPast(GPT2LMHeadModel):
    """Packs right (no past in the packing probe) but drops the past it is given."""

    def forward(self, *args, cache=None, **kwargs):
        return super().forward(*args, **kwargs)


def test_a_model_that_drops_the_past_is_detected_and_computed_plainly():
    torch.manual_seed(0)
    model = _IgnoresPast(_model("gpt2").config)
    assert lp.packing_supported(model) and not sharing_applies(model)
    prompts = _templated(4, seed=8)
    branches = _responses(prompts, 2, seed=9)
    tok, _ = group_token_logps(model, prompts, branches)
    padded, _ = lp._padded_branch_logps(model, prompts, branches, tok.shape[1], CPU)
    assert (tok - padded).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_dpkd_step_has_the_same_loss_and_gradient_with_and_without_sharing(arch):
    teacher, student = _model(arch).eval(), _model(arch)
    with torch.no_grad():  # a student other than the teacher
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    prompts = _templated(6, seed=10)
    y_t, y_s = _responses(prompts, 1, seed=11)[0], _responses(prompts, 2, seed=12)
    inp = StepInputs(student, student, teacher, [Example(p, []) for p in prompts], SamplingConfig(),
                     MethodConfig(dpkd=DPKDConfig(student_samples=2)), 0, 0, CPU)
    results = []
    for share in (True, False):
        with prefix_sharing(share):
            p_t, p_s = teacher_logps(teacher, prompts, y_t, y_s, [None] * len(prompts), CPU)
            out = pair_step(inp, y_t, y_s, dpkd_pair_loss, p_t, p_s)
            loss = 0.5 * out.loss + 0.5 * out.anchor_nll
            results.append((p_t, p_s, loss, _grads(student, loss)))
    (p_t, p_s, loss, grads), (p_t0, p_s0, loss0, grads0) = results
    assert (p_t - p_t0).abs().max() <= 1e-4 and (p_s - p_s0).abs().max() <= 1e-4  # sums of ~10 log-probs
    assert abs(loss.item() - loss0.item()) <= 1e-5 * max(1.0, abs(loss0.item()))
    for a, b in zip(grads, grads0, strict=True):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())
