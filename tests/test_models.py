"""Loading models: what prefkd changes on the way in must not change what the model computes."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import GELUTanh

from prefkd.models import load_model


def test_gpt2_gelu_is_swapped_for_the_fused_kernel_without_changing_outputs(tmp_path):
    torch.manual_seed(0)
    original = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_layer=2, n_embd=32, n_head=2, n_positions=32)).eval()
    assert original.config.activation_function == "gelu_new"  # the hub GPT-2's setting
    original.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path)).eval()
    assert loaded.config.activation_function == "gelu_pytorch_tanh"
    assert isinstance(loaded.transformer.h[0].mlp.act, GELUTanh)
    ids = torch.randint(0, 50, (3, 20))
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - original(input_ids=ids).logits).abs().max() <= 1e-5
