"""prefkd.models: loading models (what prefkd changes on the way in must not change what the model computes) and
the tokenizer prefkd trains for the models it builds."""

import pytest
import torch
from support import CHAT_FAMILIES, chat_tokenizer, save_chat_model
from transformers import AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel
from transformers.activations import GELUTanh

from prefkd.data.synthetic import SuiteConfig, build_suite
from prefkd.models import add_chat_format, build_model, load_model, save_pretrained, train_tokenizer


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


# train_tokenizer: prefkd's own byte-level BPE for the models it builds.
def test_trained_tokenizer_round_trips_and_reloads(tokenizer, tiny_suite, tmp_path):
    text = tiny_suite.test[0].prompt + tiny_suite.test[0].references[0] + " café naïve 日本"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.eos_token_id == again.pad_token_id == tokenizer.eos_token_id


def test_train_tokenizer_reaches_target_vocabulary_on_the_suite():
    suite = build_suite(SuiteConfig())
    texts = [r.prompt + r.references[0] for r in suite.d0 + suite.d] + suite.corpus
    assert len(train_tokenizer(texts, vocab_size=2048)) == 2048


# save_pretrained: what stock `generate` stops at.
@pytest.mark.parametrize("family", sorted(CHAT_FAMILIES))
def test_saved_chat_model_stops_at_the_end_of_turn_and_keeps_its_own_end_tokens(family, tiny_suite, tmp_path):
    texts = [r.prompt + r.references[0] for r in tiny_suite.d0]
    tok = chat_tokenizer(family, texts)
    model = load_model(save_chat_model(tmp_path / "hub", family, tok))
    save_pretrained(model, tok, tmp_path / "saved")
    end_of_turn, own = CHAT_FAMILIES[family][6], CHAT_FAMILIES[family][4]
    expected = list(dict.fromkeys(tok.convert_tokens_to_ids([end_of_turn, tok.eos_token, *own])))
    assert GenerationConfig.from_pretrained(tmp_path / "saved").eos_token_id == expected


def test_saved_model_of_a_built_tokenizer_stops_at_its_eos_or_at_chatml_end(tokenizer, tmp_path):
    plain = build_model("gpt2", "nano", tokenizer)
    save_pretrained(plain, tokenizer, tmp_path / "alpaca")
    assert GenerationConfig.from_pretrained(tmp_path / "alpaca").eos_token_id == tokenizer.eos_token_id
    chat = add_chat_format(AutoTokenizer.from_pretrained(tmp_path / "alpaca"))
    save_pretrained(build_model("gpt2", "nano", chat), chat, tmp_path / "chat")
    assert GenerationConfig.from_pretrained(tmp_path / "chat").eos_token_id == \
        chat.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
def test_save_pretrained_keeps_every_end_token_in_the_generation_config(tmp_path, tokenizer):
    """A saved model's generation config stops where prefkd's sampling stops: at the tokenizer's EOS, at its chat
    template's end-of-turn token, and at every end token the model already listed (an instruct model's list)."""
    import copy

    from support import save_lm
    from transformers import GenerationConfig

    from prefkd.models import add_chat_format, build_model, save_pretrained

    eos = tokenizer.eos_token_id
    assert GenerationConfig.from_pretrained(save_lm(tmp_path / "plain", tokenizer)).eos_token_id == eos  # an int
    chat = add_chat_format(copy.deepcopy(tokenizer))
    im_end = chat.convert_tokens_to_ids("<|im_end|>")
    model = build_model("gpt2", "nano", chat)
    save_pretrained(model, chat, tmp_path / "chat")
    assert GenerationConfig.from_pretrained(tmp_path / "chat").eos_token_id == [im_end, eos]
    model.generation_config.eos_token_id = [7, im_end]  # listed by the model: kept, after the end of turn and EOS
    save_pretrained(model, chat, tmp_path / "listed")
    assert GenerationConfig.from_pretrained(tmp_path / "listed").eos_token_id == [im_end, eos, 7]
    # A template prefkd cannot read (the run rendered Alpaca) does not fail the save: the EOS alone.
    chat.chat_template = "{{ raise_exception('tools only') }}"
    model.generation_config.eos_token_id = eos
    save_pretrained(model, chat, tmp_path / "unreadable")
    assert GenerationConfig.from_pretrained(tmp_path / "unreadable").eos_token_id == eos
