"""Chat models end to end through the CLI: tiny Qwen2, Llama 3 and Gemma instruct models (the hub's tokens and
templates) trained with `prefkd sft` on multi-turn conversations, distilled with every method, evaluated and
rendered; what they train on, sample and save is what their chat template renders."""

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import support
import torch
from support import (
    CHAT_CONVERSATIONS,
    CHAT_FAMILIES,
    DROPS_EARLIER_REPLIES,
    chat_record,
    chat_rows,
    chat_texts,
    marked_runs,
    write_jsonl,
)
from transformers import AutoModelForCausalLM, GenerationConfig
from typer.testing import CliRunner

from prefkd.cli import app
from prefkd.data.chat import Renderer
from prefkd.eval_files import read_records_of, read_responses
from prefkd.generation import SamplingConfig, sample_responses
from prefkd.methods import METHODS
from prefkd.models import CHATML, load_tokenizer
from prefkd.recipes import distill as distill_recipe
from prefkd.recipes import sft as sft_recipe

runner = CliRunner()
FAMILIES = sorted(CHAT_FAMILIES)
# Every piece of template markup of the three families; none belongs in a prediction.
MARKUP = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>",
          "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>", "<pad>", "<start_of_turn>",
          "<end_of_turn>"]


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory):
    """name -> a family's tokenizer, conversation files and tiny teacher and student (built on first use)."""
    built = {}

    def get(name):
        if name not in built:
            root = tmp_path_factory.mktemp(name)
            rows = chat_rows(name)
            tok = support.chat_tokenizer(name, chat_texts(CHAT_CONVERSATIONS))
            # Distillation prompts: every other conversation without its last reply (a prompt-only conversation).
            prompts = [row if i % 2 == 0 else {**row, "messages": row["messages"][:-1]} for i, row in enumerate(rows)]
            built[name] = SimpleNamespace(
                name=name, root=root, tok=tok, rows=rows, prompt_rows=prompts,
                train=write_jsonl(root / "train.jsonl", rows),
                test=write_jsonl(root / "test.jsonl", [rows[0], rows[1], rows[4]]),  # two and three turns
                prompts=write_jsonl(root / "prompts.jsonl", prompts),
                teacher=support.save_chat_model(root / "teacher", name, tok, seed=1, width=48),
                student=support.save_chat_model(root / "student", name, tok, seed=2))
        return built[name]

    return get


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _end(m) -> int:
    return m.tok.convert_tokens_to_ids(CHAT_FAMILIES[m.name][6])


def _listed_eos(m) -> list[int]:
    """What a saved student stops at: the end of turn first, then the EOS and the end tokens the instruct model's
    generation config lists (save_chat_model), each once."""
    end_of_turn, eos = CHAT_FAMILIES[m.name][6], m.tok.eos_token
    return list(dict.fromkeys(m.tok.convert_tokens_to_ids([end_of_turn, eos, *CHAT_FAMILIES[m.name][4]])))


def _spy(monkeypatch, module) -> list:
    """The examples each `train` call of `module` (a recipe) receives, the call itself unchanged."""
    seen, real = [], module.train

    def train(method, model, tokenizer, data, *args, **kwargs):
        seen.append(data.examples)
        return real(method, model, tokenizer, data, *args, **kwargs)

    monkeypatch.setattr(module, "train", train)
    return seen


def _sft(m, out, *extra):
    res = runner.invoke(app, ["sft", f"out={out}", f"model.path={m.student}", f"data.train={m.train}",
                              "train.batch_size=3", *extra])
    assert res.exit_code == 0, res.output
    return out / "model"


@pytest.mark.parametrize("name", FAMILIES)
def test_sft_on_conversations_trains_every_assistant_turn(chat_models, name, tmp_path, monkeypatch):
    m = chat_models(name)
    seen = _spy(monkeypatch, sft_recipe)
    saved = _sft(m, tmp_path / "all", "train.steps=2")
    _sft(m, tmp_path / "last", "train.steps=2", "assistant_turns=last")
    all_turns, last_turn = seen
    end = _end(m)
    assert len(all_turns) == len(last_turn) == len(m.rows) == 6
    for row, every, last in zip(m.rows, all_turns, last_turn, strict=True):
        replies = [t["content"] for t in row["messages"] if t["role"] == "assistant"]
        ids = every.prompt_ids + every.response_ids
        mask = (every.prompt_mask or [0] * len(every.prompt_ids)) + [1] * len(every.response_ids)
        # Every assistant turn of the conversation is trained on (content and end token), nothing else.
        assert marked_runs(ids, mask) == [_ids(m.tok, r) + [end] for r in replies], row["id"]
        # assistant_turns=last: the same sequence, only the last reply trained on.
        assert (last.prompt_ids, last.response_ids, last.prompt_mask) == (every.prompt_ids, every.response_ids, [])
    assert sum(bool(e.prompt_mask) for e in all_turns) == 3  # the conversations with earlier replies
    # The saved student keeps its chat template and still stops at every end token with stock `generate`.
    assert load_tokenizer(str(saved)).chat_template == m.tok.chat_template
    assert GenerationConfig.from_pretrained(saved).eos_token_id == _listed_eos(m)


ALL_METHODS = [("llama", method) for method in sorted(METHODS)]
SOME_METHODS = [(name, method) for name in ("gemma", "qwen2") for method in ("dpkd", "gkd", "kd", "seqkd", "sft")]


@pytest.mark.parametrize("name, method", ALL_METHODS + SOME_METHODS)
def test_method_distils_a_chat_student(chat_models, name, method, tmp_path, monkeypatch):
    m = chat_models(name)
    out = tmp_path / method
    seen = _spy(monkeypatch, distill_recipe)
    res = runner.invoke(app, [
        "distill", "--method", method, f"out={out}", f"student.path={m.student}", f"teacher.path={m.teacher}",
        f"data.prompts={m.train if method == 'sft' else m.prompts}", f"distill.cache_dir={m.root / 'cache'}",
        "sampling.max_new_tokens=6", "sampling.batch_size=4", "train.steps=2", "train.batch_size=3",
        "train.log_every=1"])
    assert res.exit_code == 0, res.output
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    # The method trains on the prompts as the student's chat template renders them, one example per record.
    records = [chat_record(row) for row in (m.rows if method == "sft" else m.prompt_rows)]
    assert [e.prompt_ids for e in seen[0]] == Renderer(m.tok).prompt_ids(records)
    trained = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    initial = AutoModelForCausalLM.from_pretrained(m.student).state_dict()
    assert not all(torch.equal(trained[k], initial[k]) for k in initial)
    assert load_tokenizer(str(out / "model")).chat_template == m.tok.chat_template
    assert GenerationConfig.from_pretrained(out / "model").eos_token_id == _listed_eos(m)


@pytest.mark.parametrize("name", FAMILIES)
def test_evaluate_on_conversations_predicts_replies_without_markup(chat_models, name, tmp_path):
    m = chat_models(name)
    # A student trained long enough on the short replies to end some of its samples itself.
    model = _sft(m, tmp_path / "sft", "train.steps=30", "train.lr=1e-2", "train.batch_size=6")
    out = tmp_path / "eval"
    res = runner.invoke(app, ["evaluate", f"model={model}", f"data={m.test}", "eval.seeds=1,2",
                              "eval.sampling.max_new_tokens=8", f"out={out}"])
    assert res.exit_code == 0, res.output
    tests = [m.rows[0], m.rows[1], m.rows[4]]
    records = read_records_of(out)
    assert [r.references for r in records] == [(row["messages"][-1]["content"],) for row in tests]
    assert [r.messages() for r in records] == [row["messages"][:-1] for row in tests]
    predictions = read_responses(out, records)
    stops = {*_listed_eos(m), _end(m), m.tok.eos_token_id}
    finished = 0
    for seed in (1, 2):
        rows = [json.loads(line) for line in (out / "samples" / f"seed-{seed}.jsonl").read_text().splitlines()[1:]]
        assert [r["response"] for r in rows] == predictions[seed]
        for rec, row in zip(records, rows, strict=True):
            ids = row["response_ids"]
            assert row["prompt"] == m.tok.apply_chat_template(rec.messages(), add_generation_prompt=True,
                                                              tokenize=False)
            assert not any(t in row["response"] for t in MARKUP), row["response"]
            assert row["response"] == m.tok.decode(ids, skip_special_tokens=True).strip()
            # A sample ends at its first end token, or runs to max_new_tokens without one.
            if row["finished"]:
                assert ids[-1] in stops and not stops & set(ids[:-1])
            else:
                assert len(ids) == 8 and not stops & set(ids)
            finished += row["finished"]
    assert finished >= 1
    settings = json.loads((out / "settings.json").read_text())
    assert settings["generation"]["ended_with_eos"] == round(finished / 6, 4)

    # Stock transformers, with the generation config the student was saved with, ends a greedy reply where
    # prefkd's sampling ends it (16 tokens: the Llama and Gemma students end theirs).
    stock = AutoModelForCausalLM.from_pretrained(model)
    renderer = Renderer(load_tokenizer(str(model)))
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=16)
    prompts = renderer.prompt_ids(records)
    ours = sample_responses(stock, prompts, greedy, renderer.tokenizer.pad_token_id, renderer.stop_ids_for(stock))
    for prompt, reply in zip(prompts, ours, strict=True):
        theirs = stock.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                do_sample=False, max_new_tokens=16)
        assert theirs[0, len(prompt):].tolist() == reply
    if name == "gemma":  # its replies end with <end_of_turn>, which is not the tokenizer's EOS
        assert [reply[-1] for reply in ours] == [_end(m)] * 3


def _rendered(m, row):
    """What `prefkd render` must show of a conversation row: the template's own rendering."""
    rec = chat_record(row)
    prompt = m.tok.apply_chat_template(rec.messages(), add_generation_prompt=True, tokenize=False)
    prompt_ids = list(m.tok.apply_chat_template(rec.messages(), add_generation_prompt=True, tokenize=True,
                                                return_dict=False))
    reply = rec.references[0] if rec.references else None
    response_ids = _ids(m.tok, reply) + [_end(m)] if reply else []
    earlier = [_ids(m.tok, t["content"]) + [_end(m)] for t in rec.messages() if t["role"] == "assistant"]
    return prompt, reply or "", prompt_ids, response_ids, earlier


@pytest.mark.parametrize("name", FAMILIES)
def test_render_shows_what_the_chat_template_renders(chat_models, name):
    m = chat_models(name)
    res = runner.invoke(app, ["render", "--model", m.student, "--data", str(m.prompts), "--json", "--limit", "0"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [line["id"] for line in lines] == [row["id"] for row in m.prompt_rows]
    for line, row in zip(lines, m.prompt_rows, strict=True):
        prompt, response, prompt_ids, response_ids, earlier = _rendered(m, row)
        assert (line["prompt"], line["response"]) == (prompt, response)
        assert (line["prompt_tokens"], line["response_tokens"]) == (len(prompt_ids), len(response_ids))
        assert line["input_ids"] == prompt_ids + response_ids
        assert marked_runs(line["input_ids"], line["trained"]) == earlier + ([response_ids] if response_ids else [])

    res = runner.invoke(app, ["render", "--model", m.student, "--data", str(m.prompts), "--limit", "2"])
    assert res.exit_code == 0, res.output
    stops = " ".join(dict.fromkeys([CHAT_FAMILIES[name][6], m.tok.eos_token, *CHAT_FAMILIES[name][4]]))
    headers = [f"template: the chat template of {m.student}; end of turn: {CHAT_FAMILIES[name][6]}; sampling stops "
               f"at: {stops}"]
    for row in m.prompt_rows[:2]:
        _, _, prompt_ids, response_ids, earlier = _rendered(m, row)
        trained = sum(map(len, earlier))
        headers.append(f"=== {row['id']}: prompt, {len(prompt_ids)} tokens"
                       + (f" ({trained} of them earlier assistant turns, trained on)" if trained else "") + " ===")
        headers.append(f"=== response, {len(response_ids)} tokens with the end token, trained on ===")
    assert [line for line in res.stdout.splitlines() if line.startswith(("template: ", "==="))] == headers
    assert res.stdout.count("(none: a prompt without a reply)") == 1  # c2 ends with a user turn


def test_render_of_a_tokenizer_alone_names_its_own_stop_tokens(chat_models, tmp_path):
    m = chat_models("llama")
    m.tok.save_pretrained(tmp_path / "tokenizer")  # no model: no generation config with <|end_of_text|>
    res = runner.invoke(app, ["render", "--model", str(tmp_path / "tokenizer"), "--data", str(m.train)])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0] == (f"template: the chat template of {tmp_path / 'tokenizer'}; end of turn: "
                                          "<|eot_id|>; sampling stops at: <|eot_id|>")


def test_render_of_the_last_turn_needs_no_prefix_stable_template(chat_models, tmp_path):
    """assistant_turns=last trains only the last reply, so a template that rewrites earlier turns renders (as
    `prefkd sft assistant_turns=last` trains); with all turns it is refused."""
    m = chat_models("qwen2")
    template = tmp_path / "drops.jinja"
    template.write_text(DROPS_EARLIER_REPLIES)
    args = ["render", "--model", m.student, "--data", str(m.train), "--json", "--limit", "0", f"template={template}"]
    res = runner.invoke(app, [*args, "assistant_turns=last"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [sum(line["trained"][: line["prompt_tokens"]]) for line in lines] == [0] * 6
    assert [line["response_tokens"] for line in lines] == [len(_ids(m.tok, row["messages"][-1]["content"])) + 1
                                                           for row in m.rows]
    res = runner.invoke(app, [*args, "assistant_turns=all"])
    assert res.exit_code == 2 and "c1 field 'messages': the chat template" in res.output


def test_white_box_refuses_a_teacher_with_another_chat_template_and_black_box_uses_it(chat_models, tmp_path,
                                                                                      monkeypatch):
    m = chat_models("qwen2")
    teacher = tmp_path / "teacher-chatml"  # the same vocabulary, ChatML without Qwen's default system prompt
    shutil.copytree(m.teacher, teacher)
    tok = load_tokenizer(str(teacher))
    tok.chat_template = CHATML
    tok.save_pretrained(teacher)
    common = [f"student.path={m.student}", f"teacher.path={teacher}", f"data.prompts={m.prompts}",
              f"distill.cache_dir={tmp_path / 'cache'}", "sampling.max_new_tokens=6", "train.steps=2",
              "train.batch_size=3"]
    res = runner.invoke(app, ["distill", "--method", "kd", f"out={tmp_path / 'kd'}", *common])
    assert res.exit_code == 2
    assert (f"error: method 'kd' is white-box: teacher and student must see the same prompt, but the student's chat "
            f"template (the chat template of {m.student}) differs from the teacher's (the chat template of "
            f"{teacher}) (student '{m.student}', teacher '{teacher}'). Give both the same chat template "
            "(data.template=FILE sets one for both), or a method that distils across tokenizers and templates "
            "(dpkd, dpo, ipo, cpo, simpo, seqkd, plad, uld).") in res.output

    seen = _spy(monkeypatch, distill_recipe)
    res = runner.invoke(app, ["distill", "--method", "seqkd", f"out={tmp_path / 'seqkd'}", *common])
    assert res.exit_code == 0, res.output
    # The teacher is sampled on its own template's prompts; the student trains on its own, with the samples in its
    # tokens and its end token where a sample ended.
    (cache,) = (tmp_path / "cache").glob("teacher-*.jsonl")
    rows = [json.loads(line) for line in cache.read_text().splitlines()[1:]]
    records = [chat_record(row) for row in m.prompt_rows]
    assert [r["prompt"] for r in rows] == [tok.apply_chat_template(r.messages(), add_generation_prompt=True,
                                                                   tokenize=False) for r in records]
    default_system = "You are Qwen, created by Alibaba Cloud."  # in the student's prompts without a system turn
    assert sum(default_system in student_prompt for student_prompt in map(Renderer(m.tok).prompt, records)) == 4
    assert not any(default_system in r["prompt"] for r in rows)
    (examples,) = seen
    student = Renderer(m.tok)
    assert [e.prompt_ids for e in examples] == student.prompt_ids(records)
    assert [e.response_ids for e in examples] == [_ids(m.tok, r["response"]) + ([_end(m)] if r["finished"] else [])
                                                  for r in rows]
