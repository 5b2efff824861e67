"""prefkd.methods.cross_tokenizer and DPKD across tokenizers: texts cross between tokenizers by a stated rule, the
teacher scores them in its own tokens (equal to `text_logprobs`), and rewards are normalised by tokens or bytes."""

import copy
import json

import pytest
import torch
from support import chat_tokenizer
from typer.testing import CliRunner

from prefkd.cli import app
from prefkd.data.chat import Renderer
from prefkd.data.records import Instruction
from prefkd.errors import PrefkdError
from prefkd.logprobs import text_ids, text_logprobs
from prefkd.methods import dpkd
from prefkd.methods.cross_tokenizer import TeacherTokens, byte_length
from prefkd.models import add_chat_format, build_model, save_pretrained

runner = CliRunner()
AWKWARD = [" leading space", "trailing space ", "two\nlines\n", "caf\u00e9 \u00fcber \u4e2d\u6587",
           "says <|eot_id|> and <|im_end|> as text", ""]


@pytest.fixture(scope="module")
def pair(tokenizer):
    """A ChatML student tokenizer (the suite's BPE) and a Llama-3 teacher tokenizer of another vocabulary."""
    student = add_chat_format(copy.deepcopy(tokenizer))
    texts = ["the cat sat on the mat", "caf\u00e9 \u00fcber alles", "two plus two is four"] * 40
    teacher = chat_tokenizer("llama", texts, vocab_size=450)
    return Renderer(student), Renderer(teacher)


def test_a_teacher_sample_crosses_as_its_text_plus_the_students_end_token(pair):
    student, teacher = pair
    tt = TeacherTokens(teacher, student, teacher.stop_ids, [])
    s_end = student.tokenizer.convert_tokens_to_ids("<|im_end|>")
    t_end = teacher.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for text in AWKWARD:
        t_ids = text_ids(teacher.tokenizer, text)
        assert tt.text(t_ids, teacher) == text  # no text is lost or added on the way out
        assert tt.to_student(t_ids + [t_end]) == text_ids(student.tokenizer, text) + [s_end]  # ended: the end token
        assert tt.to_student(t_ids) == text_ids(student.tokenizer, text)  # cut by length: none
        s_ids = text_ids(student.tokenizer, text)
        assert tt.to_teacher(s_ids + [s_end], student.stop_ids) == t_ids + [t_end]
        assert byte_length(t_ids + [t_end], teacher.tokenizer) == len(text.encode("utf-8"))
    # the other model's special-token strings in a text stay characters: never the reader's end token
    inside = tt.to_student(text_ids(teacher.tokenizer, AWKWARD[4]))
    assert s_end not in inside and student.tokenizer.decode(inside) == AWKWARD[4]


def test_the_teachers_template_wrapping_is_not_part_of_the_text(pair):
    """A teacher sample's template markup (its special tokens) is dropped; plain text is kept as written."""
    student, teacher = pair
    tt = TeacherTokens(teacher, student, teacher.stop_ids, [])
    header = teacher.tokenizer.convert_tokens_to_ids(["<|start_header_id|>", "<|end_header_id|>"])
    ids = [header[0], *text_ids(teacher.tokenizer, "hi there"), header[1]]
    assert tt.text(ids, teacher) == "hi there"


def test_token_lengths_across_tokenizers_give_each_model_its_own_count():
    """beta/|y|_S (log q - p') with p' = p |y|_S/|y|_T is the reward beta (log q/|y|_S - log p/|y|_T)."""
    q = torch.tensor([-4.0, -9.0, -2.0])
    p_t, p_s = torch.tensor([-6.0]), torch.tensor([-3.0, -5.0])
    n_student = torch.tensor([4.0, 3.0, 2.0])
    n_teacher = torch.tensor([2.0, 6.0, 5.0])
    inp = type("Inp", (), {"cfg": type("C", (), {"dpkd": type("D", (), {"length_unit": "tokens",
                                                                       "length_normalize": True})()})(),
                           "teacher_tokens": object(), "tokenizer": None})()
    n, pt, ps = dpkd._lengths(inp, [[]] * 3, n_student, n_teacher, p_t, p_s)
    got = (q - torch.cat([pt, ps])) / n
    want = q / n_student - torch.cat([p_t, p_s]) / n_teacher
    assert torch.allclose(got, want)


def test_byte_lengths_are_the_texts_utf8_lengths(pair):
    student, _ = pair
    responses = [text_ids(student.tokenizer, t) for t in AWKWARD]
    inp = type("Inp", (), {"cfg": type("C", (), {"dpkd": type("D", (), {"length_unit": "bytes"})()})(),
                           "teacher_tokens": None, "tokenizer": student.tokenizer})()
    n, _, _ = dpkd._lengths(inp, responses, torch.ones(len(responses)))
    assert n.tolist() == [max(1, len(t.encode("utf-8"))) for t in AWKWARD]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer, pair):
    root = tmp_path_factory.mktemp("cross")
    student_tok, teacher_tok = pair[0].tokenizer, pair[1].tokenizer
    save_pretrained(build_model("gpt2", "nano", student_tok, seed=2), student_tok, root / "student")
    save_pretrained(build_model("llama", "micro", teacher_tok, seed=1), teacher_tok, root / "teacher")
    prompts = root / "prompts.jsonl"
    rows = [{"instruction": f"Say something about item {i}.", "input": ""} for i in range(8)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, prompts


def test_the_teacher_scores_the_students_samples_as_text_logprobs_of_their_text(models, monkeypatch):
    """In a DPKD step across tokenizers, log p(y_s) is the teacher's `text_logprobs` of the student sample's text
    after the teacher's own rendering of the prompt (the number a teacher server returns for that text), and
    log p(y_t) the teacher's log-prob of the tokens it sampled; the student reads y_t as the sample's text."""
    root, prompts = models
    seen = {}
    real_logps, real_step = dpkd.teacher_logps, dpkd.pair_step

    def logps(teacher, prompts, y_t, y_s, known, device):
        out = real_logps(teacher, prompts, y_t, y_s, known, device)
        seen["teacher"] = (teacher, prompts, y_t, out)
        return out

    def step(inp, y_t, y_s, pair_loss, p_t=None, p_s=None, teacher_lengths=None):
        seen["student"] = (inp, y_t, y_s)
        return real_step(inp, y_t, y_s, pair_loss, p_t, p_s, teacher_lengths)

    monkeypatch.setattr(dpkd, "teacher_logps", logps)
    monkeypatch.setattr(dpkd, "pair_step", step)
    res = runner.invoke(app, ["distill", "--method", "dpkd", f"out={root / 'run'}", f"student.path={root / 'student'}",
                              f"teacher.path={root / 'teacher'}", f"data.prompts={prompts}", "train.steps=1",
                              "train.batch_size=4", "sampling.max_new_tokens=6", "diagnostics.every=0"])
    assert res.exit_code == 0, res.output
    teacher, teacher_prompt_ids, y_t_teacher, (p_t, p_s) = seen["teacher"]
    inp, y_t, y_s = seen["student"]
    tt = inp.teacher_tokens
    records = [Instruction(f"Say something about item {e.index}.") for e in inp.examples]
    teacher_prompts = [tt.teacher.prompt(r) for r in records]
    assert teacher_prompt_ids == [teacher_tokenized(tt, p) for p in teacher_prompts]
    for i, ys in enumerate(y_s[0]):
        ended = bool(ys) and ys[-1] in tuple(inp.eos_id)
        want = text_logprobs(teacher, tt.teacher.tokenizer, [teacher_prompts[i]], [tt.text(ys, tt.student)],
                             end_ids=None if ended else [])
        assert p_s[i].item() == pytest.approx(want.item(), abs=1e-4)
    for i, (ids, yt) in enumerate(zip(y_t_teacher, y_t, strict=True)):
        assert tt.text(yt, tt.student) == tt.text(ids, tt.teacher)  # the student reads the teacher's text
        with torch.no_grad():
            full = torch.tensor([teacher_prompt_ids[i] + ids])
            logits = teacher.double()(input_ids=full).logits[0]
            teacher.float()
        start = len(teacher_prompt_ids[i])
        want = sum(torch.log_softmax(logits[start + j - 1], -1)[t].item() for j, t in enumerate(ids))
        assert p_t[i].item() == pytest.approx(want, abs=1e-4)


def teacher_tokenized(tt, prompt):
    return tt.teacher.with_bos(tt.teacher.tokenizer(prompt, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("method,extra", [("dpkd", ["distill.dpkd.length_unit=bytes"]),
                                          ("dpkd", ["distill.dpkd.length_unit=tokens",
                                                    "distill.dpkd.teacher_samples=cached"]),
                                          ("dpo", []), ("ipo", []), ("cpo", []), ("simpo", []), ("seqkd", []),
                                          ("plad", []), ("plad-margin", []), ("uld", []),
                                          ("uld", ["distill.uld.alignment=bytes"])])
def test_every_cross_tokenizer_method_runs_across_tokenizers(models, method, extra, tmp_path):
    root, prompts = models
    res = runner.invoke(app, ["distill", "--method", method, f"out={tmp_path / method}",
                              f"student.path={root / 'student'}", f"teacher.path={root / 'teacher'}",
                              f"data.prompts={prompts}", "train.steps=2", "train.batch_size=4", "train.log_every=1",
                              "sampling.max_new_tokens=6", f"distill.cache_dir={tmp_path / 'cache'}", *extra])
    assert res.exit_code == 0, res.output
    log = [json.loads(line) for line in (tmp_path / method / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(row["loss"])) for row in log)


def test_token_level_methods_refuse_another_tokenizer_and_say_what_works(models, tmp_path):
    root, prompts = models
    res = runner.invoke(app, ["distill", "--method", "kd", f"out={tmp_path / 'kd'}", f"student.path={root / 'student'}",
                              f"teacher.path={root / 'teacher'}", f"data.prompts={prompts}", "train.steps=1"])
    assert res.exit_code == 2
    assert "tokenizers differ" in res.output and "dpkd" in res.output and "uld" in res.output
    assert not (tmp_path / "kd").exists()


def test_a_token_level_dpkd_anchor_is_refused_across_tokenizers(models, tmp_path):
    root, prompts = models
    res = runner.invoke(app, ["distill", "--method", "dpkd", f"out={tmp_path / 'a'}",
                              f"student.path={root / 'student'}", f"teacher.path={root / 'teacher'}",
                              f"data.prompts={prompts}", "train.steps=1", "distill.dpkd.anchor=kd"])
    assert res.exit_code == 2 and "anchor=ce" in res.output


def test_train_tokenizer_pairs_differ(pair):
    """The fixture is what it claims: two vocabularies (the rest of this file would prove nothing otherwise)."""
    student, teacher = pair
    assert student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab()
    assert len(student.tokenizer) != len(teacher.tokenizer)


def test_teacher_prompts_are_cut_from_the_left_to_fit_its_context_with_the_longest_response(pair):
    student, teacher = pair
    tt = TeacherTokens(teacher, student, teacher.stop_ids, [], context=10)
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8]]
    branches = [[[9, 9, 9], [9]], [[9] * 6, [9, 9]]]  # y_t, then one y_s per prompt
    assert tt.fit(prompts, branches) == [[3, 4, 5, 6], [7, 8]]  # 4 + 6 fits 10; 2 + 2 needed no cut
    with pytest.raises(PrefkdError, match="10 positions"):
        tt.fit(prompts, [[[9] * 10, [9]]])


def test_a_cached_samples_text_enters_the_students_tokens_as_plain_text(pair):
    """`Renderer.sample_ids` (cached teacher samples of seqkd, plad, uld): special-token strings stay characters."""
    student, _ = pair
    s_end = student.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = student.sample_ids(AWKWARD[4], finished=True)
    assert ids[-1] == s_end and s_end not in ids[:-1]
    assert ids == text_ids(student.tokenizer, AWKWARD[4]) + [s_end]
    assert student.sample_ids("cut short", finished=False) == text_ids(student.tokenizer, "cut short")
