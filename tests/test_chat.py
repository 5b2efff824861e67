"""prefkd.data.chat on the three chat families (Qwen2.5 ChatML, Llama 3 headers, Gemma turns): prompts are the
template's tokens, responses end with the family's end-of-turn token, sampling stops at every end token, multi-turn
SFT marks exactly the earlier assistant turns, and `data.template` chooses how records are rendered."""

import copy
import functools
from types import SimpleNamespace

import pytest
import support
from support import (
    CHAT_CONVERSATIONS,
    CHAT_FAMILIES,
    DROPS_EARLIER_REPLIES,
    MINILLM_HEAD,
    chat_record,
    chat_rows,
    chat_texts,
    marked_runs,
)
from transformers import GenerationConfig

from prefkd.data.chat import Renderer, renderer_for
from prefkd.data.collate import collate, encode_examples
from prefkd.data.records import Instruction
from prefkd.errors import ConfigError, DataError
from prefkd.models import CHATML, add_chat_format, load_tokenizer

FAMILIES = sorted(CHAT_FAMILIES)
AFTER_END = {"qwen2": "\n", "llama": "", "gemma": "\n"}  # what each template writes after a turn's end token


@functools.cache
def _tokenizer(name):
    return support.chat_tokenizer(name, chat_texts(CHAT_CONVERSATIONS))


def tokenizer_of(name):
    """A fresh copy of `name`'s tokenizer (trained once), free to change."""
    return copy.deepcopy(_tokenizer(name))


def _end(name, tok) -> tuple[str, int]:
    token = CHAT_FAMILIES[name][6]
    return token, tok.convert_tokens_to_ids(token)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _template_ids(tok, messages):
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


@pytest.mark.parametrize("name", FAMILIES)
def test_prompt_ids_are_the_templates_tokens_with_one_bos(name):
    tok = tokenizer_of(name)
    r = Renderer(tok)
    records = [Instruction("Name a fruit."), chat_record(chat_rows(name)[1]), chat_record(chat_rows(name)[4])]
    if name != "gemma":  # a system prompt, alone and before several turns
        records += [Instruction("Say hello.", context=(("system", "You are a helpful assistant."),
                                                       ("user", "Say hello."))),
                    chat_record(CHAT_CONVERSATIONS[0])]
    got = r.prompt_ids(records)
    assert [len(rec.messages()) for rec in records][:3] == [1, 5, 3]
    for rec, ids in zip(records, got, strict=True):
        assert ids == _template_ids(tok, rec.messages()), rec
        if name == "qwen2":  # no BOS at all: the prompt opens with the template's first token
            assert tok.bos_token_id is None and r.bos is None
            assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
        else:  # the template writes the BOS and the tokenizer would add another: exactly one
            assert _ids(tok, "a")[0] != tok.bos_token_id and tok("a")["input_ids"][0] == tok.bos_token_id
            assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(got[0]) == tok.apply_chat_template([{"role": "user", "content": "Name a fruit."}],
                                                         add_generation_prompt=True, tokenize=False)


def test_gemmas_refusal_of_a_system_turn_is_a_data_error_naming_the_record():
    r = Renderer(tokenizer_of("gemma"))
    rec = chat_record(CHAT_CONVERSATIONS[3])  # c4: system + user
    with pytest.raises(DataError) as e:
        r.prompt_ids([rec])
    assert str(e.value) == ("c4 field 'messages': the chat template (the chat template of the tokenizer) refuses "
                            "this conversation: System role not supported")


@pytest.mark.parametrize("name", FAMILIES)
def test_response_is_the_content_and_the_end_of_turn_token_as_the_template_renders_them(name):
    tok = tokenizer_of(name)
    r = Renderer(tok)
    end_token, end = _end(name, tok)
    row = chat_rows(name)[1]  # three turns
    rec, reply = chat_record(row), row["messages"][-1]["content"]
    assert r.end_ids == [end] and r.response_ids(rec, reply) == _ids(tok, reply) + [end]
    # Whitespace around the reply: Llama 3 and Gemma trim content, ChatML keeps it; the response is what the
    # template writes, and prompt + response + end token is the template's rendering of the whole conversation.
    for text, content in ((reply, reply), ("  Six, or so.\n", "  Six, or so.\n" if name == "qwen2" else
                                           "Six, or so.")):
        full = tok.apply_chat_template([*rec.messages(), {"role": "assistant", "content": text}], tokenize=False)
        assert r.response(rec, text) == content
        assert r.prompt(rec) + content + end_token + AFTER_END[name] == full
        trained = r.prompt_ids([rec])[0] + r.response_ids(rec, text)
        assert tok.decode(trained) == full[: len(full) - len(AFTER_END[name])]


@pytest.mark.parametrize("name", FAMILIES)
def test_stop_ids_are_the_end_of_turn_token_the_eos_and_every_generation_config_eos(name):
    tok = tokenizer_of(name)
    r = Renderer(tok)
    _, end = _end(name, tok)
    listed = [tok.convert_tokens_to_ids(t) for t in CHAT_FAMILIES[name][4]]
    expected = {"qwen2": ["<|im_end|>"], "llama": ["<|eot_id|>"], "gemma": ["<end_of_turn>", "<eos>"]}[name]
    assert r.stop_ids == tuple(tok.convert_tokens_to_ids(expected)) and end in r.stop_ids
    assert tok.eos_token_id in r.stop_ids and r.stop_ids_for(None) == r.stop_ids
    # The instruct model's generation config lists its end tokens (Qwen's <|endoftext|>, Llama's <|end_of_text|>
    # beside the tokenizer's); an id only the model lists (7) is a stop too.
    with_list = r.stop_ids_for(SimpleNamespace(generation_config=GenerationConfig(eos_token_id=[*listed, 7])))
    assert with_list == (*r.stop_ids, *[i for i in listed if i not in r.stop_ids], 7)
    assert set(with_list) == {end, tok.eos_token_id, *listed, 7} and len(set(with_list)) == len(with_list)
    assert r.stop_ids_for(SimpleNamespace(generation_config=GenerationConfig(eos_token_id=7))) == (*r.stop_ids, 7)


@pytest.mark.parametrize("name", FAMILIES)
def test_multi_turn_mask_marks_exactly_the_earlier_assistant_turns(name):
    tok = tokenizer_of(name)
    r = Renderer(tok)
    end_token, end = _end(name, tok)
    earlier_turns = []
    for row in chat_rows(name):
        rec, reply = chat_record(row), row["messages"][-1]["content"]
        prompt_ids, response_ids, mask = r.conversation(rec, reply)
        assert prompt_ids == r.prompt_ids([rec])[0] and response_ids == r.response_ids(rec, reply)
        assert len(mask) == len(prompt_ids)
        earlier = [m["content"] for m in row["messages"][:-1] if m["role"] == "assistant"]
        runs = marked_runs(prompt_ids, mask)
        # Each earlier assistant turn is one marked stretch: its content's tokens and the end token, nothing else.
        assert runs == [_ids(tok, c) + [end] for c in earlier], row["id"]
        assert [tok.decode(run) for run in runs] == [c + end_token for c in earlier]
        earlier_turns.append(len(earlier))
    assert earlier_turns == [1, 2, 0, 0, 1, 0]


def test_a_template_that_rewrites_earlier_turns_cannot_train_them_and_says_so(tmp_path):
    path = tmp_path / "drops.jinja"
    path.write_text(DROPS_EARLIER_REPLIES)
    r = renderer_for(tokenizer_of("qwen2"), str(path))
    one_turn, three_turns = chat_record(CHAT_CONVERSATIONS[2]), chat_record(CHAT_CONVERSATIONS[1])
    assert r.conversation(one_turn, "An apple.")[2] == [0] * len(r.prompt_ids([one_turn])[0])
    assert r.prompt(three_turns).count("<|im_start|>assistant\n<|im_end|>") == 2  # the prompt itself renders
    with pytest.raises(DataError) as e:
        r.conversation(three_turns, "Six.")
    assert str(e.value) == (
        f"c2 field 'messages': the chat template (the Jinja file {path}) renders earlier turns differently once the "
        "conversation goes on (e.g. it drops their reasoning), so their tokens cannot be trained on in one "
        "sequence; train on the last turn only (`prefkd sft assistant_turns=last`)")


@pytest.mark.parametrize("name", FAMILIES)
def test_an_instruction_with_an_input_is_one_user_turn(name):
    tok = tokenizer_of(name)
    r = Renderer(tok)
    rec = Instruction("Summarise the passage.", "Rain fell for days.")
    turn = [{"role": "user", "content": "Summarise the passage.\n\nRain fell for days."}]
    assert r.prompt(rec) == tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    assert r.prompt_ids([rec])[0] == _template_ids(tok, turn)


@pytest.mark.parametrize("name", FAMILIES)
def test_template_alpaca_on_a_chat_tokenizer_renders_alpaca_and_ends_with_the_eos(name):
    tok = tokenizer_of(name)
    r = renderer_for(tok, "alpaca")
    alpaca = MINILLM_HEAD + "### Instruction:\nName a fruit.\n\n### Response:\n"
    for rec in (Instruction("Name a fruit."), chat_record(CHAT_CONVERSATIONS[2])):  # a one-turn conversation too
        assert r.prompt(rec) == alpaca
        bos = [] if name == "qwen2" else [tok.bos_token_id]  # the tokenizer's own BOS, once
        assert r.prompt_ids([rec])[0] == bos + _ids(tok, alpaca)
        assert r.response_ids(rec, "An apple.") == _ids(tok, "An apple.") + [tok.eos_token_id]
    assert r.kind == "alpaca" and r.stop_ids == (tok.eos_token_id,)
    assert tok.convert_ids_to_tokens(r.end_ids) == [{"qwen2": "<|im_end|>", "llama": "<|eot_id|>",
                                                     "gemma": "<eos>"}[name]]


def test_template_chat_needs_a_chat_template_and_auto_falls_back_to_alpaca(tokenizer):
    assert Renderer(tokenizer).kind == "alpaca" and Renderer(tokenizer, "auto").name == "the Alpaca template"
    with pytest.raises(ConfigError) as e:
        Renderer(tokenizer, "chat")
    assert str(e.value) == ("data.template=chat but the tokenizer has no chat template; use data.template=alpaca, or "
                            "pass a Jinja file as data.template")
    with pytest.raises(ConfigError, match="data.template 'chatml.jinja' is neither one of"):
        renderer_for(tokenizer, "chatml.jinja")  # no such file


ROLE_COLON = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if m['role'] == 'assistant' %}"
              "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}"
              "{% endif %}")


def test_a_jinja_file_sets_the_template_and_a_model_saved_afterwards_carries_it(tmp_path, tokenizer):
    base = copy.deepcopy(tokenizer)  # a base model's tokenizer: no chat template, pad == eos
    path = tmp_path / "role-colon.jinja"
    path.write_text(ROLE_COLON)
    r = renderer_for(base, str(path))
    assert base.chat_template == ROLE_COLON and (r.kind, r.name) == ("chat", f"the Jinja file {path}")
    rec = chat_record(CHAT_CONVERSATIONS[4])
    assert r.prompt(rec) == "user: Name an animal.\nassistant: A cat.<|endoftext|>\nuser: A bigger one?\nassistant: "
    assert r.response_ids(rec, "A horse.") == _ids(base, "A horse.") + [base.eos_token_id]
    saved = load_tokenizer(support.save_lm(tmp_path / "model", base))
    assert saved.chat_template == ROLE_COLON
    assert Renderer(saved).prompt_ids([rec]) == r.prompt_ids([rec])


@pytest.mark.parametrize("name", FAMILIES)
def test_pad_equal_to_eos_keeps_the_end_token_in_the_loss(name):
    tok = tokenizer_of(name)
    tok.pad_token = tok.eos_token  # as load_tokenizer sets it for Llama 3, whose tokenizer has no pad
    r = Renderer(tok)
    _, end = _end(name, tok)
    rows = chat_rows(name)[2:4]
    records = [chat_record(row) for row in rows]
    responses = [r.response_ids(rec, row["messages"][-1]["content"]) for rec, row in zip(records, rows, strict=True)]
    examples, dropped = encode_examples(r.prompt_ids(records), responses)
    batch = collate(examples, tok.pad_token_id)
    assert dropped == 0
    width = batch["input_ids"].shape[1]
    assert min(len(e.prompt_ids) + len(e.response_ids) for e in examples) < width  # one row is padded
    for i, e in enumerate(examples):
        n_p, n = len(e.prompt_ids), len(e.prompt_ids) + len(e.response_ids)
        assert batch["response_mask"][i].tolist() == [0] * n_p + [1] * (n - n_p) + [0] * (width - n)
        assert batch["input_ids"][i, n - 1] == end and batch["attention_mask"][i].sum() == n


def test_chatml_added_to_a_built_tokenizer_ends_turns_with_im_end(tokenizer):
    tok = add_chat_format(copy.deepcopy(tokenizer))  # pad == eos == bos == <|endoftext|>
    r = Renderer(tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.chat_template == CHATML and r.end_ids == [im_end] and r.stop_ids == (im_end, tok.eos_token_id)
    rec = Instruction("Name a fruit.")
    assert r.prompt(rec) == "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n"
    assert r.prompt_ids([rec])[0][0] == tok.convert_tokens_to_ids("<|im_start|>")  # no BOS: GPT-2 adds none
    assert r.response_ids(rec, "An apple.") == _ids(tok, "An apple.") + [im_end]


def test_alpaca_refuses_a_conversation_it_cannot_render(tokenizer):
    r = Renderer(tokenizer)  # auto: the tokenizer has no chat template
    for row in (CHAT_CONVERSATIONS[1], CHAT_CONVERSATIONS[3]):  # several turns; a system prompt and one turn
        rec = chat_record(row)
        for render, args in ((r.prompt_ids, ([rec],)), (r.conversation, (rec, "x"))):
            with pytest.raises(DataError) as e:
                render(*args)
            assert str(e.value) == (
                f"{row['id']} field 'messages': the Alpaca template renders one instruction, not a conversation "
                "with a system prompt or several turns; use a model with a chat template (data.template=chat) or a "
                "Jinja file as data.template")
