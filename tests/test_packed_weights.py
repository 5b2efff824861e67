import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from prefkd import packed_weights
from prefkd.generation import SamplingConfig, sample_responses
from prefkd.packed_weights import PackedForward, mkl_packing_available, packed_linears, worth_packing

EOS = 0


def test_this_machine_packs():
    # The tests below compare packed and plain products; on a torch without MKL they would compare plain with plain.
    assert mkl_packing_available(), "torch was built without MKL: packed decoding is off here, and untested"


def _layers():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80)
    conv = Conv1D(80, 48)  # GPT-2's layer: weight [in, out]
    conv.weight.data.normal_()
    conv.bias.data.normal_()
    return linear, conv


@pytest.mark.parametrize("which", [0, 1])
def test_packed_product_is_the_plain_one(which):
    layer = _layers()[which]
    x = torch.randn(3, 6, 48)
    with torch.no_grad():
        want = {n: layer(x[:, :n].reshape(-1, 48)[None]) for n in (1, 2, 3)}  # 3, 6, 9 rows (packed for 6)
        with packed_linears(layer, 6, True) as count:
            assert count == 1 and isinstance(layer.forward, PackedForward)
            got = {n: layer(x[:, :n].reshape(-1, 48)[None]) for n in (1, 2, 3)}
    assert "forward" not in vars(layer)  # the module's own forward again
    assert torch.equal(got[2], want[2])  # the packed row count: bitwise
    assert torch.equal(got[3], want[3])  # more rows (a prefill): the module's own forward
    assert got[1].shape == want[1].shape == (1, 3, 80)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-5)  # padded to 6 rows: another kernel's rounding


def test_the_forward_comes_back_after_an_error():
    linear, _ = _layers()
    with pytest.raises(RuntimeError, match="inside"), packed_linears(linear, 4, True):
        raise RuntimeError("inside")
    assert "forward" not in vars(linear)


def test_only_plain_fp32_cpu_layers_are_packed():
    hooked = torch.nn.Linear(8, 8)
    hooked.forward = lambda x: x  # a forward someone else replaced (accelerate's offload hooks): left alone
    model = torch.nn.ModuleDict({"fp32": torch.nn.Linear(8, 8), "bf16": torch.nn.Linear(8, 8).bfloat16(),
                                 "hooked": hooked, "meta": torch.nn.Linear(8, 8, device="meta"),
                                 "embedding": torch.nn.Embedding(4, 8)})
    with packed_linears(model, 4, True) as count:
        assert count == 1 and isinstance(model["fp32"].forward, PackedForward)
        assert model["hooked"].forward(torch.ones(1)).item() == 1.0
    with packed_linears(model, 4, False) as count:
        assert count == 0


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_layer=2, n_embd=32, n_head=2, n_positions=64,
                                      eos_token_id=EOS, pad_token_id=EOS, bos_token_id=EOS))


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64))


@pytest.mark.parametrize("make", [_gpt2, _llama])
def test_sampling_through_packed_weights_samples_the_same_tokens(make, monkeypatch):
    model = make()
    calls = []
    call = PackedForward.__call__
    monkeypatch.setattr(PackedForward, "__call__", lambda self, x: calls.append(len(x.reshape(-1, x.shape[-1])))
                        or call(self, x))
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14], [15, 16, 17, 18, 19]]
    with torch.no_grad():
        model.lm_head.weight[EOS] += 2.0  # rows end at different steps: the batch shrinks below the packed rows
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=12, batch_size=3)
    plain = sample_responses(model, prompts, cfg, EOS, EOS, seed=4, pack_weights=False)
    assert calls == []
    packed = sample_responses(model, prompts, cfg, EOS, EOS, seed=4, pack_weights=True)
    assert packed == plain
    assert {1, 2, 3} <= set(calls)  # whole batches, shrunken ones and the last batch of 2 went through packed weights
    assert len({len(r) for r in plain}) > 1
    assert all("forward" not in vars(m) for m in model.modules())


def test_the_rule_packs_large_fp32_models_on_long_responses(monkeypatch):
    model = _gpt2()
    assert not worth_packing(model, 256)  # 2x32: its weights stay in the caches
    monkeypatch.setattr(packed_weights, "MIN_WEIGHT_BYTES", 0)
    assert worth_packing(model, 256)
    assert not worth_packing(model, packed_weights.MIN_NEW_TOKENS - 1)  # too short to repay the packing pass
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not worth_packing(model, 256)  # autocast multiplies in bf16, not through fp32 weights
    monkeypatch.setattr(packed_weights, "available_memory", lambda: 1000)
    assert not worth_packing(model, 256)  # no room for the packed copy


@pytest.mark.parametrize("shape", [(48, 80), (130, 7), (64, 64), (1, 5)])
def test_transposed_is_a_contiguous_copy_of_the_transpose(shape):
    w = torch.randn(shape)
    got = packed_weights.transposed(w)
    assert got.is_contiguous() and got.shape == shape[::-1]
    assert torch.equal(got, w.t())  # 130 rows: two full blocks of 64 and a partial one
