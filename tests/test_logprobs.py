"""prefkd.logprobs: sequence and token log-probs against a log-softmax summed by hand, and the fast paths (chunked
log-softmax, packing with shared prompts) equal to the plain computation."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import prefkd.logprobs as lp
from prefkd.data.collate import Example, collate
from prefkd.logprobs import (
    group_token_logps,
    response_token_logps,
    selective_log_softmax,
    sequence_logps,
)

VOCAB = 97


def _model(arch: str, attn: str):
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=4, n_positions=64, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(vocab_size=VOCAB, num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, bos_token_id=0,
                          eos_token_id=0, pad_token_id=0)
        model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = attn
    return model


def _examples(n: int, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(1, VOCAB, (int(torch.randint(lo, hi, (), generator=g)),), generator=g).tolist()

    return [Example(ids(1, 14), ids(1, 10)) for _ in range(n)]


def _padded(model, examples):
    return lp._padded_response_token_logps(model, collate(examples, 0))


def _grads(model, value):
    return torch.autograd.grad(value, [p for p in model.parameters()])


def test_chunked_log_softmax_equals_full_in_fp32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 37, 1000, generator=g) * 3
    labels = torch.randint(0, 1000, (4, 37), generator=g)
    full = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    exact = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    small_chunks = 3 * 1000  # 3 positions per chunk: 50 chunks
    assert torch.equal(selective_log_softmax(logits, labels, small_chunks), full)  # same kernel row by row
    # With autograd the memory-lean form (logit - logsumexp) is used: as exact, and its gradient is the same.
    x = logits.clone().requires_grad_(True)
    chunked = selective_log_softmax(x, labels, small_chunks)
    assert (chunked - full).abs().max() <= 1e-5 and (chunked.double() - exact).abs().max() <= 1e-5
    y = logits.clone().requires_grad_(True)
    reference = torch.log_softmax(y, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    weights = torch.randn(4, 37, generator=g)
    (gx,) = torch.autograd.grad((chunked * weights).sum(), x)
    (gy,) = torch.autograd.grad((reference * weights).sum(), y)
    assert (gx - gy).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_response_logps_equal_padded_forward(arch, attn):
    model = _model(arch, attn)
    examples = _examples(7)
    batch = collate(examples, 0)
    packed, mask = response_token_logps(model, batch)
    padded, padded_mask = _padded(model, examples)
    assert torch.equal(mask, padded_mask) and packed.shape == padded.shape
    assert (packed - padded).abs().max() <= 1e-5
    weights = torch.randn(padded.shape)
    for a, b in zip(_grads(model, (packed * weights).sum()), _grads(model, (padded * weights).sum()), strict=True):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_shared_prompt_pairs_equal_one_padded_forward_per_response(arch):
    model = _model(arch, "sdpa")
    examples = _examples(6, seed=1)
    prompts = [e.prompt_ids for e in examples]
    chosen = [e.response_ids for e in examples]
    rejected = [list(reversed(e.response_ids))[:4] for e in examples]
    tok, mask = group_token_logps(model, prompts, [chosen, rejected])
    for k, responses in enumerate((chosen, rejected)):
        ref, _ = _padded(model, [Example(p, r) for p, r in zip(prompts, responses, strict=True)])
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            row = tok[k * len(prompts) + i]
            assert mask[k * len(prompts) + i].sum() == len(r)
            assert (row[: len(r)] - ref[i, len(p) - 1: len(p) - 1 + len(r)]).abs().max() <= 1e-5
            assert (row[len(r):] == 0).all()


def test_lm_blocks_score_every_token_but_the_first():
    model = _model("gpt2", "sdpa")
    blocks = torch.randint(1, VOCAB, (3, 16), generator=torch.Generator().manual_seed(2))
    ones = torch.ones_like(blocks)
    batch = {"input_ids": blocks, "attention_mask": ones, "response_mask": ones}
    packed, mask = response_token_logps(model, batch)
    padded, _ = lp._padded_response_token_logps(model, batch)
    assert mask.sum() == 3 * 15 and (packed - padded).abs().max() <= 1e-5


def test_logits_are_computed_only_for_scored_positions():
    model = _model("gpt2", "sdpa")
    examples = _examples(5, seed=3)
    rows = []
    handle = model.lm_head.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    response_token_logps(model, collate(examples, 0))
    handle.remove()
    assert rows == [sum(len(e.response_ids) for e in examples)]


def test_models_without_custom_masks_fall_back_to_the_padded_forward(monkeypatch):
    model = _model("gpt2", "sdpa")
    examples = _examples(4, seed=4)
    packed = group_token_logps(model, [e.prompt_ids for e in examples], [[e.response_ids for e in examples]])
    monkeypatch.setattr(lp, "packing_supported", lambda m: False)
    padded = group_token_logps(model, [e.prompt_ids for e in examples], [[e.response_ids for e in examples]])
    assert torch.equal(packed[1], padded[1]) and (packed[0] - padded[0]).abs().max() <= 1e-5


def test_empty_responses_score_nothing_and_leave_the_others_unchanged():
    model = _model("gpt2", "sdpa")
    prompts = [[5, 6, 7], [8, 9]]
    tok, mask = group_token_logps(model, prompts, [[[10, 11], []], [[], [12]]])
    assert mask.tolist() == [[1, 1], [0, 0], [0, 0], [1, 0]]
    ref, _ = _padded(model, [Example([5, 6, 7], [10, 11]), Example([8, 9], [12])])
    assert (tok[0] - ref[0, 2:4]).abs().max() <= 1e-5 and abs(tok[3, 0] - ref[1, 1]) <= 1e-5


class _IgnoresMasks(GPT2LMHeadModel):
    """A model whose forward drops a custom attention mask (plain causal attention over the whole row)."""

    def forward(self, *args, attention_mask=None, **kwargs):
        return super().forward(*args, **kwargs)


class _NoLogitsToKeep(GPT2LMHeadModel):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=use_cache)


@pytest.mark.parametrize("cls", [_IgnoresMasks, _NoLogitsToKeep])
def test_models_that_cannot_pack_are_detected_and_use_the_padded_path(cls):
    torch.manual_seed(0)
    model = cls(_model("gpt2", "sdpa").config)
    assert not lp.packing_supported(model)
    examples = _examples(4, seed=5)
    tok, _ = response_token_logps(model, collate(examples, 0))
    assert (tok - _padded(model, examples)[0]).abs().max() == 0  # it is the padded path
    assert lp.packing_supported(_model("gpt2", "sdpa"))


# The plain computation the fast paths are compared with, against a log-softmax summed by hand.
def _tiny_gpt2(vocab=50):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=1, n_embd=16, n_head=2, n_positions=32,
                                      eos_token_id=0, pad_token_id=0, bos_token_id=0)).eval()


def test_sequence_logps_match_manual_and_ignore_padding():
    model = _tiny_gpt2()
    ex = [Example([5, 6, 7], [8, 9, 0]), Example([11, 12], [13, 0])]
    logps, lengths = sequence_logps(model, collate(ex, 0))
    assert lengths.tolist() == [3, 2]
    for i, e in enumerate(ex):  # each alone, unpadded, summed by hand over the response tokens only
        ids = torch.tensor([e.prompt_ids + e.response_ids])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        n_p = len(e.prompt_ids)
        manual = sum(logp[t - 1, ids[0, t]].item() for t in range(n_p, ids.shape[1]))
        assert abs(logps[i].item() - manual) < 1e-4


def test_response_token_logps_zero_outside_mask():
    model = _tiny_gpt2()
    b = collate([Example([5, 6], [8, 0]), Example([5], [0])], 0)
    tok, mask = response_token_logps(model, b)
    assert mask.tolist() == [[0, 1, 1], [1, 0, 0]]
    assert (tok[mask == 0] == 0).all() and (tok[mask == 1] < 0).all()


def test_selective_log_softmax_equals_full():
    logits = torch.randn(5, 7, 33)
    labels = torch.randint(0, 33, (5, 7))
    full = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(selective_log_softmax(logits, labels, chunk_elements=2 * 33), full, atol=1e-6)


def test_chunked_logsumexp_gradient_is_softmax_as_in_float64():
    from prefkd.logprobs import logsumexp_rows

    torch.manual_seed(0)
    logits = (torch.randn(23, 33) * 4).requires_grad_()
    upstream = torch.randn(23)
    (logsumexp_rows(logits, chunk_elements=2 * 33) * upstream).sum().backward()  # 12 chunks, the last of 1 row
    # d logsumexp / d logits = softmax, in float64 from the same numbers
    expected = torch.softmax(logits.detach().double(), -1) * upstream.double()[:, None]
    assert torch.allclose(logits.grad.double(), expected, rtol=1e-5, atol=1e-7)
    whole = logits.detach().clone().requires_grad_()
    (torch.logsumexp(whole, -1) * upstream).sum().backward()
    assert torch.equal(logits.grad, whole.grad)  # chunks are rows of the same kernel: the same numbers


# --- text_logprobs: the probability a model gives a text, in its own tokens ---------------------------------------

AWKWARD = [" leading space", "trailing space ", "two\nlines\n", "caf\u00e9 \u00fcber \u4e2d\u6587 \U0001F600",
           "literal <|im_end|> and <|endoftext|> inside", ""]


def _brute_force(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """float64 forward of the whole sequence, log-softmax at every response position, summed in a loop."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model.double()(input_ids=ids).logits[0].double()
    model.float()
    total = 0.0
    for j, token in enumerate(response_ids):
        total += torch.log_softmax(logits[len(prompt_ids) + j - 1], -1)[token].item()
    return total


def test_text_logprobs_equals_a_float64_brute_force_on_awkward_texts(tokenizer):
    from prefkd.logprobs import text_logprobs
    from prefkd.models import add_chat_format, build_model

    chat = add_chat_format(copy.deepcopy(tokenizer))
    model = build_model("llama", "nano", chat, max_positions=512, seed=3).eval()
    prompts = ["<|im_start|>user\nSay something.<|im_end|>\n<|im_start|>assistant\n"] * len(AWKWARD)
    got = text_logprobs(model, chat, prompts, AWKWARD, batch_size=4)
    end = chat.convert_tokens_to_ids("<|im_end|>")
    for i, text in enumerate(AWKWARD):
        p = chat(prompts[i], add_special_tokens=False)["input_ids"]
        r = chat(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [end]
        assert chat.decode(r[:-1]) == text  # the plain-text ids are the text, special-token strings included
        assert got[i].item() == pytest.approx(_brute_force(model, p, r), abs=1e-4)
    # the special-token strings inside a text are characters, not the tokens: a different (longer) sequence
    inside = chat(AWKWARD[4], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert end not in inside and chat.convert_tokens_to_ids("<|endoftext|>") not in inside


def test_text_logprobs_adds_the_bos_a_tokenizer_adds_once(tmp_path):
    from support import chat_tokenizer, save_chat_model

    from prefkd.logprobs import text_logprobs
    from prefkd.models import load_model, load_tokenizer

    texts = ["the cat sat on the mat", "two plus two is four"] * 40
    path = save_chat_model(tmp_path / "llama", "llama", chat_tokenizer("llama", texts), seed=1)
    model, tok = load_model(path).eval(), load_tokenizer(path)
    bos, eot = tok.bos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")
    plain = "Question: the cat?\nAnswer:"  # no BOS in the text: the tokenizer's own is added
    templated = tok.apply_chat_template([{"role": "user", "content": "the cat?"}], tokenize=False,
                                        add_generation_prompt=True)  # the template wrote its BOS: not a second one
    got = text_logprobs(model, tok, [plain, templated], [" sat", "sat on the mat"])
    p_plain = [bos] + tok(plain, add_special_tokens=False)["input_ids"]
    p_templated = tok(templated, add_special_tokens=False)["input_ids"]
    assert p_templated[0] == bos and p_templated.count(bos) == 1
    want = [_brute_force(model, p_plain, tok(" sat", add_special_tokens=False)["input_ids"] + [eot]),
            _brute_force(model, p_templated, tok("sat on the mat", add_special_tokens=False)["input_ids"] + [eot])]
    assert got.tolist() == pytest.approx(want, abs=1e-4)
