import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from prefkd import lora
from prefkd.errors import PrefkdError
from prefkd.lora import LoRAConfig, apply_lora, detect_target_modules, n_trainable, save_trained
from prefkd.models import build_model, load_model, save_pretrained

GPT2_TARGETS = ["c_attn", "c_fc", "c_proj"]
LLAMA_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
CFG = LoRAConfig(r=4, alpha=8, dropout=0.1)


def _ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode("who is the oldest person here?")[:12]] * 2)


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits


def _expected_lora_params(model, targets: list[str], r: int) -> int:
    # A is r x in and B is out x r, so each adapted weight adds r * (in + out) whichever way it is stored.
    return sum(r * sum(m.weight.shape) for name, m in model.named_modules()
               if name.rsplit(".", 1)[-1] in targets and hasattr(m, "weight"))


def _train(model, ids: torch.Tensor, steps: int = 5) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optim.zero_grad()
        loss.backward()
        optim.step()


@pytest.mark.parametrize("arch,targets", [("gpt2", GPT2_TARGETS), ("llama", LLAMA_TARGETS)])
def test_detects_attention_and_mlp_projections(tokenizer, arch, targets):
    assert detect_target_modules(build_model(arch, "nano", tokenizer)) == targets


def test_detection_without_linear_layers_raises():
    with pytest.raises(PrefkdError, match="no linear layers"):
        detect_target_modules(torch.nn.Sequential(torch.nn.Embedding(4, 2)))


@pytest.mark.parametrize("arch,targets", [("gpt2", GPT2_TARGETS), ("llama", LLAMA_TARGETS)])
def test_only_lora_trains_and_init_matches_base(tokenizer, arch, targets):
    model = build_model(arch, "nano", tokenizer)
    ids = _ids(tokenizer)
    base_logits = _logits(model, ids)  # before wrapping: peft replaces the base modules in place
    expected = _expected_lora_params(model, targets, CFG.r)
    _, base_total = n_trainable(model)

    wrapped = apply_lora(model, CFG)
    assert isinstance(wrapped, peft.PeftModel)
    trainable, total = n_trainable(wrapped)
    assert trainable == expected and total == base_total + expected
    assert all("lora_" in n for n, p in wrapped.named_parameters() if p.requires_grad)
    torch.testing.assert_close(_logits(wrapped, ids), base_logits, rtol=0, atol=1e-6)


def test_explicit_targets_override_detection(tokenizer):
    model = apply_lora(build_model("gpt2", "nano", tokenizer), LoRAConfig(r=2, target_modules=["c_attn"]))
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert adapted == {"c_attn"}


def test_unknown_target_raises(tokenizer):
    with pytest.raises(PrefkdError, match="cannot apply LoRA"):
        apply_lora(build_model("gpt2", "nano", tokenizer), LoRAConfig(r=2, target_modules=["nope"]))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_trained_adapter_saves_merged_and_alone(tokenizer, tmp_path, arch):
    # The realistic flow: a student loaded from a path, so the adapter config records where its base lives.
    base_dir = tmp_path / "base"
    save_pretrained(build_model(arch, "nano", tokenizer), tokenizer, base_dir)
    ids = _ids(tokenizer)
    model = apply_lora(load_model(str(base_dir)), CFG)
    before = _logits(model, ids)
    _train(model, ids)
    after = _logits(model, ids)
    assert not torch.allclose(before, after, atol=1e-3)

    save_trained(model, tokenizer, tmp_path / "merged", CFG)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, ids), after, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(model, ids), after)  # merging worked on a copy: the caller's model is intact

    adapter_cfg = LoRAConfig(r=CFG.r, alpha=CFG.alpha, dropout=CFG.dropout, save="adapter")
    save_trained(model, tokenizer, tmp_path / "adapter", adapter_cfg)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "adapter" / "tokenizer.json").exists()
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(_logits(auto, ids), after, rtol=0, atol=1e-5)
    explicit = peft.PeftModel.from_pretrained(load_model(str(base_dir)), tmp_path / "adapter")
    torch.testing.assert_close(_logits(explicit, ids), after, rtol=0, atol=1e-5)


def test_rank_zero_is_a_no_op_and_saves_plainly(tokenizer, tmp_path):
    model = build_model("gpt2", "nano", tokenizer)
    assert apply_lora(model, LoRAConfig()) is model
    assert n_trainable(model)[0] == n_trainable(model)[1]
    save_trained(model, tokenizer, tmp_path / "out", LoRAConfig())
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_bad_config_raises(tokenizer, tmp_path):
    model = build_model("gpt2", "nano", tokenizer)
    with pytest.raises(PrefkdError, match="unknown lora.save 'full'"):
        apply_lora(model, LoRAConfig(r=2, save="full"))  # caught before any training
    with pytest.raises(PrefkdError, match="positive rank"):
        apply_lora(model, LoRAConfig(r=-1))
    wrapped = apply_lora(model, LoRAConfig(r=2))
    with pytest.raises(PrefkdError, match="unknown lora.save"):
        save_trained(wrapped, tokenizer, tmp_path / "out", LoRAConfig(r=2, save="full"))
    assert not (tmp_path / "out").exists()
    assert lora.SAVE_MODES == ("merged", "adapter")
