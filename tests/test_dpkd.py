"""dpkd options of prefkd's own: K student samples, the leave-one-out baseline, the KD anchor on y_t, the reverse-KL
anchor on y_s."""

import pytest
import torch
from support import assert_same_value_and_grads, lm_head_rows

from prefkd import losses
from prefkd.data.collate import Example, collate
from prefkd.errors import ConfigError
from prefkd.generation import SamplingConfig
from prefkd.methods import MethodConfig, StepInputs, get_method
from prefkd.methods.dpkd import DPKDConfig, _kd_anchor, _rkl_anchor, dpkd_pair_loss, pair_step, teacher_logps
from prefkd.methods.on_policy import RKLConfig
from prefkd.models import build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pairs(tokenizer):
    teacher = build_model("gpt2", "micro", tokenizer, seed=1).eval()
    student = build_model("gpt2", "nano", tokenizer, seed=2)
    g = torch.Generator().manual_seed(0)

    def seqs(lengths):
        return [torch.randint(1, 300, (n,), generator=g).tolist() for n in lengths]

    prompts, y_t = seqs((5, 9, 3)), seqs((4, 2, 6))
    y_s = [seqs((3, 7, 1)), seqs((2, 2, 5)), seqs((6, 1, 3))]  # K = 3 samples per prompt, branch-major
    return teacher, student, prompts, y_t, y_s


def _inp(teacher, student, prompts, tokenizer, **dpkd):
    return StepInputs(student, student, teacher, [Example(p, []) for p in prompts], SamplingConfig(),
                      MethodConfig(dpkd=DPKDConfig(**dpkd)), tokenizer.pad_token_id, tokenizer.eos_token_id, CPU)


def test_k_samples_average_the_k_pairs(pairs, tokenizer):
    teacher, student, prompts, y_t, y_s = pairs
    p_t, p_s = teacher_logps(teacher, prompts, y_t, y_s, [None] * 3, CPU)
    inp = _inp(teacher, student, prompts, tokenizer, student_samples=3)
    together = pair_step(inp, y_t, y_s, dpkd_pair_loss, p_t, p_s).loss
    alone = [pair_step(inp, y_t, [y], dpkd_pair_loss, p_t, p_s[3 * 0 + j * 3: (j + 1) * 3]).loss for j, y in
             enumerate(y_s)]
    assert torch.allclose(together, torch.stack(alone).mean(), atol=1e-6)
    # The teacher's log-probs of each sample equal scoring that branch alone.
    for j, y in enumerate(y_s):
        _, one = teacher_logps(teacher, prompts, y_t, [y], [None] * 3, CPU)
        assert torch.allclose(p_s[j * 3: (j + 1) * 3], one, atol=1e-5)
    known = [p_t[0].item(), None, p_t[2].item()]  # cached y_t log-probs take the packed path with K branches
    p_t2, p_s2 = teacher_logps(teacher, prompts, y_t, y_s, known, CPU)
    assert torch.allclose(p_t2, p_t, atol=1e-5) and torch.allclose(p_s2, p_s, atol=1e-5)


def test_loo_keeps_the_value_and_takes_the_baselined_gradient(pairs, tokenizer):
    teacher, student, prompts, y_t, y_s = pairs
    p_t, p_s = teacher_logps(teacher, prompts, y_t, y_s, [None] * 3, CPU)
    grads = {}
    for baseline in ("none", "loo"):
        student.zero_grad()
        out = pair_step(_inp(teacher, student, prompts, tokenizer, student_samples=3, baseline=baseline), y_t, y_s,
                        dpkd_pair_loss, p_t, p_s)
        out.loss.backward()
        grads[baseline] = (out.loss.item(), torch.cat([p.grad.flatten() for p in student.parameters()]))
    assert grads["none"][0] == pytest.approx(grads["loo"][0], abs=1e-6)
    assert not torch.allclose(grads["none"][1], grads["loo"][1])
    # Against the pure loss on the same log-probs: the surrogate's gradient is the LOO one.
    student.zero_grad()
    from prefkd.logprobs import group_token_logps

    q_tok, mask = group_token_logps(student, prompts, [y_t, *y_s], CPU)
    q, n = q_tok.sum(-1), mask.sum(-1)
    loss, _, _ = losses.dpkd_loo_loss(q[:3], q[3:].view(3, 3).T, p_t, p_s.view(3, 3).T, n[:3], n[3:].view(3, 3).T)
    loss.backward()
    assert torch.allclose(torch.cat([p.grad.flatten() for p in student.parameters()]), grads["loo"][1], atol=1e-6)


def test_kd_anchor_is_the_forward_kl_on_teacher_samples(pairs, tokenizer):
    teacher, student, prompts, y_t, y_s = pairs
    p_t, p_s = teacher_logps(teacher, prompts, y_t, y_s[:1], [None] * 3, CPU)
    out = pair_step(_inp(teacher, student, prompts, tokenizer, anchor="kd"), y_t, y_s[:1], dpkd_pair_loss, p_t, p_s)
    batch = collate([Example(p, y) for p, y in zip(prompts, y_t, strict=True)], tokenizer.pad_token_id)
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    assert out.anchor_name == "anchor_kl"
    assert out.anchor_nll.item() == pytest.approx(losses.forward_kl(s, t, batch["response_mask"][:, 1:]).item(),
                                                  abs=1e-5)
    ce = pair_step(_inp(teacher, student, prompts, tokenizer), y_t, y_s[:1], dpkd_pair_loss, p_t, p_s)
    assert ce.anchor_name == "anchor_nll" and ce.anchor_nll.item() != pytest.approx(out.anchor_nll.item())


def test_rkl_anchor_is_the_reverse_kl_on_the_students_sample(pairs, tokenizer):
    teacher, student, prompts, y_t, y_s = pairs
    p_t, p_s = teacher_logps(teacher, prompts, y_t, y_s[:2], [None] * 3, CPU)
    out = pair_step(_inp(teacher, student, prompts, tokenizer, anchor="rkl", student_samples=2), y_t, y_s[:2],
                    dpkd_pair_loss, p_t, p_s)
    assert out.anchor_name == "anchor_rkl" and out.anchor_count == sum(map(len, y_s[0]))
    # float64 brute force: sum_v q log(q / p) at every token of the first sample y_s[0], mean over its tokens
    kls = []
    with torch.no_grad():
        for p, y in zip(prompts, y_s[0], strict=True):
            ids = torch.tensor([p + y])
            log_q = student(input_ids=ids).logits[0, len(p) - 1: -1].double().log_softmax(-1)
            log_p = teacher(input_ids=ids).logits[0, len(p) - 1: -1].double().log_softmax(-1)
            kls += (log_q.exp() * (log_q - log_p)).sum(-1).tolist()
    assert out.anchor_nll.item() == pytest.approx(sum(kls) / len(kls), abs=1e-5)
    # ce+rkl: one mean over y_t's CE tokens and y_s's reverse-KL tokens
    both = pair_step(_inp(teacher, student, prompts, tokenizer, anchor="ce+rkl", student_samples=2), y_t, y_s[:2],
                     dpkd_pair_loss, p_t, p_s)
    ce = pair_step(_inp(teacher, student, prompts, tokenizer, student_samples=2), y_t, y_s[:2], dpkd_pair_loss, p_t,
                   p_s)
    n_t = sum(map(len, y_t))
    assert both.anchor_name == "anchor_ce_rkl" and both.anchor_count == n_t + len(kls)
    assert both.anchor_nll.item() == pytest.approx((ce.anchor_nll.item() * n_t + sum(kls)) / (n_t + len(kls)),
                                                   abs=1e-5)


@pytest.mark.parametrize("prompt_lengths", [(5, 9, 3), (4, 60, 6)])
@pytest.mark.parametrize("anchor", ["kd", "rkl"])
def test_token_anchors_on_the_scored_columns_equal_the_full_logits(tokenizer, prompt_lengths, anchor):
    """The kd / rkl anchors run the LM head from the first scored column (methods/base.py): value and gradients
    are those of the divergence on the full [B, T, V] logits."""
    teacher = build_model("gpt2", "micro", tokenizer, seed=1).eval()
    student = build_model("gpt2", "nano", tokenizer, seed=2)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 300, (n,), generator=g).tolist() for n in prompt_lengths]
    responses = [torch.randint(1, 300, (n,), generator=g).tolist() for n in (6, 2, 4)]
    inp = StepInputs(student, student, teacher, [Example(p, []) for p in prompts], SamplingConfig(),
                     MethodConfig(dpkd=DPKDConfig(anchor=anchor), rkl=RKLConfig(temperature=0.7)),
                     tokenizer.pad_token_id, tokenizer.eos_token_id, CPU)
    with lm_head_rows(student) as rows:
        got = (_kd_anchor if anchor == "kd" else _rkl_anchor)(inp, prompts, responses)
    batch = collate([Example(p, y) for p, y in zip(prompts, responses, strict=True)], tokenizer.pad_token_id)
    assert rows == [batch["input_ids"].shape[1] - (min(prompt_lengths) - 1)]
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["response_mask"][:, 1:]
    want = losses.forward_kl(s, t, mask) if anchor == "kd" else losses.reverse_kl(s, t, mask, 0.7)
    assert_same_value_and_grads(student, got, want)


@pytest.mark.parametrize("dpkd, method, match", [
    ({"baseline": "loo"}, "dpkd", "student_samples >= 2"),
    ({"baseline": "loo", "student_samples": 2}, "dpo", "--method dpkd"),
    ({"anchor": "jsd"}, "dpkd", "anchor must be one of ce, kd, rkl, ce\\+rkl"),
    ({"baseline": "mean"}, "dpkd", "baseline must be one of none, loo"),
    ({"student_samples": 0}, "dpkd", "at least 1"),
])
def test_impossible_options_are_refused(dpkd, method, match):
    """Impossible values are refused when the config is built; impossible combinations by the method's check."""
    with pytest.raises(ConfigError, match=match):
        get_method(method).check(MethodConfig(dpkd=DPKDConfig(**dpkd)))
