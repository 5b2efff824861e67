"""A short real run through the CLI: builds, trains, distils, saves, reloads with stock transformers, generates."""

import json

import numpy as np
import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
from typer.testing import CliRunner

from prefkd.cli import app
from prefkd.eval_files import read_records_of, read_responses
from prefkd.evaluate import exact_match, rouge_l
from prefkd.generation import SamplingConfig, sample_responses
from prefkd.models import CHATML
from prefkd.recipes.render import RenderRun, render_records

TINY = ["data.suite.n_people=16", "data.suite.skill_per_family=4", "data.suite.test_world_questions=4",
        "data.suite.test_profiles=2", "data.suite.test_skill=7", "data.suite.val_world_questions=2",
        "data.suite.val_profiles=1", "data.suite.val_skill=7", "data.suite.corpus_skill_per_family=4",
        "data.vocab_size=400", "bootstrap=200", "diagnostics.prompts=4", "teacher.size=micro", "student.size=nano",
        "teacher_train.steps=6", "student_train.steps=4", "distill_train.steps=3", "distill_train.batch_size=4",
        "distill_train.log_every=1", "distill_train.save_every=2", "teacher_train.save_every=3",
        "sampling.max_new_tokens=8",
        "eval.seeds=10,20", "eval.sampling.max_new_tokens=8", "distill.lm_block_size=32"]


def _eval_dir(out, name):
    """The one evaluation directory of a row (one training seed): eval/test/<name>/{model,seed0}."""
    (scores,) = (out / "eval" / "test" / name).glob("*/prompt_scores.json")
    return scores.parent


def _check_scores_from_predictions(out, results):
    """Each row's Rouge-L and exact match, recomputed here from the saved predictions and references: a wrong
    metric, a score of the wrong file or a mean over the wrong axis all differ."""
    for row in results["rows"]:
        where = _eval_dir(out, row["name"])
        records = read_records_of(where)
        responses = read_responses(where, records)
        assert sorted(responses) == results["seeds"], row["name"]
        for metric, fn in (("rougeL", rouge_l), ("exact_match", exact_match)):
            per_seed = [np.mean([fn(t, r.references) for t, r in zip(responses[seed], records, strict=True)])
                        for seed in results["seeds"]]
            assert row[metric]["per_seed"] == pytest.approx(per_seed), (row["name"], metric)
            assert row[metric]["mean"] == pytest.approx(np.mean(per_seed)), (row["name"], metric)


def test_demo_end_to_end_and_stage_reuse(tmp_path):
    out = tmp_path / "demo"
    runner = CliRunner()
    res = runner.invoke(app, ["demo", "--out", str(out), *TINY])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ["teacher", "sft", "sft_continued", "dpkd"]
    assert results["seeds"] == [10, 20]
    _check_scores_from_predictions(out, results)
    dpkd = results["rows"][-1]["rougeL"]
    assert dpkd["ci95"][0] <= dpkd["mean"] <= dpkd["ci95"][1]
    assert set(dpkd["vs"]) == {"sft", "sft_continued"} and "gap_recovered" in dpkd
    assert "| dpkd |" in (out / "report.md").read_text()
    assert "data:image/png;base64," in (out / "report.html").read_text()
    diag = [json.loads(line) for line in (out / "dpkd" / "seed0" / "diagnostics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in diag] == [0, 3] and "first_token_rkl" in diag[0]
    log = [json.loads(line) for line in (out / "dpkd" / "seed0" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3]
    for key in ("loss", "pref_loss", "reward_chosen", "reward_rejected", "margin", "pref_accuracy",
                "teacher_logp_student", "seq_rkl", "anchor_nll", "replay_nll", "lm_loss"):
        assert key in log[0], key
    assert (out / "config.yaml").is_file() and not (out / "teacher" / "checkpoint").exists()

    # The distilled student is a stock transformers model.
    path = str(out / "dpkd" / "seed0" / "model")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    gen = pipeline("text-generation", model=model, tokenizer=tok)
    # Greedy, so stock transformers' text must be a decode of the ids prefkd's own decoder picks for that prompt.
    prompt = read_records_of(_eval_dir(out, "dpkd"))[0].prompt
    text = gen(prompt, max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    ours = sample_responses(model, [tok(prompt, add_special_tokens=False)["input_ids"]],
                            SamplingConfig(temperature=0.0, max_new_tokens=6), tok.pad_token_id, tok.eos_token_id)[0]
    assert text == tok.decode(ours, skip_special_tokens=True)

    # A rerun reuses every finished stage: no model file is rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")}
    res = runner.invoke(app, ["demo", "--out", str(out), *TINY])
    assert res.exit_code == 0, res.output
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")}
    # Changing the distillation settings retrains only the distilled student.
    res = runner.invoke(app, ["demo", "--out", str(out), *TINY, "distill.kappa=1.0"])
    assert res.exit_code == 0, res.output
    changed = {p for p in stamps if p.stat().st_mtime_ns != stamps[p]}
    assert changed == {out / "dpkd" / "seed0" / "model" / "model.safetensors"}


def test_cli_errors_are_one_line(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "distill.kapa=1"])
    assert res.exit_code == 2
    assert "did you mean 'distill.kappa'" in res.output and "Traceback" not in res.output


def test_verbs_on_demo_outputs(tmp_path, tokenizer):
    """`prefkd sft`, `distill` and `evaluate` on record files, as a user with their own models would run them."""
    from support import tiny_files

    runner = CliRunner()
    files = tiny_files(tmp_path, tokenizer)
    common = ["train.batch_size=4", "train.log_every=1"]
    for name, size in (("teacher", "micro"), ("student", "nano")):
        res = runner.invoke(app, ["sft", f"out={tmp_path / name}", f"tokenizer={files['tokenizer']}",
                                  f"model.size={size}", f"data.train={files['train']}", "train.steps=2", *common])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["distill", "--method", "dpkd", f"out={tmp_path / 'dpkd'}",
                              f"student.path={tmp_path / 'student' / 'model'}",
                              f"teacher.path={tmp_path / 'teacher' / 'model'}", f"data.prompts={files['train']}",
                              f"data.replay={files['train']}", f"data.corpus={files['corpus']}",
                              "distill.lm_block_size=16", "sampling.max_new_tokens=6", "train.steps=2", *common])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "dpkd" / "model" / "model.safetensors").is_file()
    assert "_git_commit" in (tmp_path / "dpkd" / "config.yaml").read_text()
    res = runner.invoke(app, ["evaluate", f"model={tmp_path / 'dpkd' / 'model'}", f"data={files['test']}",
                              "eval.seeds=1,2", "eval.sampling.max_new_tokens=6"])
    assert res.exit_code == 0, res.output
    scores = json.loads((tmp_path / "dpkd" / "model" / "eval" / "scores.json").read_text())
    assert len(scores["all"]["rougeL"]["per_seed"]) == 2


def test_white_box_method_refuses_different_tokenizers(tmp_path, tokenizer):
    from support import tiny_files

    runner = CliRunner()
    files = tiny_files(tmp_path, tokenizer)
    other = tmp_path / "other_tok"
    from prefkd.models import train_tokenizer

    train_tokenizer(["completely different text " * 50], vocab_size=300).save_pretrained(other)
    for name, tok in (("teacher", other), ("student", files["tokenizer"])):
        res = runner.invoke(app, ["sft", f"out={tmp_path / name}", f"tokenizer={tok}", "model.size=nano",
                                  f"data.train={files['train']}", "train.steps=1", "train.batch_size=2"])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["distill", "--method", "kd", f"out={tmp_path / 'x'}",
                              f"student.path={tmp_path / 'student' / 'model'}",
                              f"teacher.path={tmp_path / 'teacher' / 'model'}", f"data.prompts={files['train']}"])
    assert res.exit_code == 2
    assert "white-box" in res.output and "plad" in res.output


def test_demo_compares_several_methods(tmp_path):
    out = tmp_path / "multi"
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--methods", "kd,seqkd,plad", *TINY,
                                   "continued_sft=false", "eval.seeds=10", "judge.path=teacher"])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ["teacher", "sft", "kd", "seqkd", "plad"]
    # judge.path=teacher: the teacher's log-likelihood judges every response against the references. The win rate
    # is recomputed from the saved judge scores: 100 where the response beats the reference, 0 where it loses, 50
    # on a tie or where the response is the reference word for word (the suite's records have one reference each).
    _check_scores_from_predictions(out, results)
    for row in results["rows"]:
        where = _eval_dir(out, row["name"])
        ps = json.loads((where / "prompt_scores.json").read_text())
        records = read_records_of(where)
        score, ref = np.array(ps["judge_score"]), np.array(ps["judge_reference"])
        wins = np.where(score > ref, 100.0, np.where(score < ref, 0.0, 50.0))
        for i, seed in enumerate(ps["seeds"]):
            for j, (text, r) in enumerate(zip(read_responses(where, records)[seed], records, strict=True)):
                if text.strip() in {x.strip() for x in r.references}:
                    wins[i, j] = 50.0
        assert row["win_rate"]["per_seed"] == pytest.approx(wins.mean(axis=1).tolist()), row["name"]
        assert row["win_rate"]["mean"] == pytest.approx(wins.mean()), row["name"]
    assert "win rate vs refs" in (out / "report.md").read_text()
    # kd and seqkd train on the same cached teacher samples of D's prompts: one teacher cache, one student cache.
    assert len(list((out / "cache").glob("teacher-*.jsonl"))) == 2  # T 1.0 for kd/seqkd, T 0.7 for plad pairs
    assert len(list((out / "cache").glob("student-*.jsonl"))) == 1
    # The student never saw D's references: the distillation prompts file has none.
    rows = [json.loads(line) for line in (out / "data" / "d_prompts.jsonl").read_text().splitlines()]
    assert rows and all(r["references"] == [] for r in rows)


def test_chat_demo_runs_in_chatml_end_to_end(tmp_path):
    """`data.template=chat`: the tokenizer gains ChatML, and every stage (SFT of teacher and student, distillation
    and its sample caches, evaluation) renders records with it through `data.template=auto`."""
    out = tmp_path / "chat"
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--methods", "kd,plad", *TINY, "data.template=chat",
                                   "continued_sft=false", "eval.seeds=10"])
    assert res.exit_code == 0, res.output
    assert "ChatML" in res.output
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ["teacher", "sft", "kd", "plad"]
    _check_scores_from_predictions(out, results)

    start, end = "<|im_start|>", "<|im_end|>"
    for name in ("teacher/model", "sft/model", "kd/seed0/model", "plad/seed0/model"):
        path = str(out / name)
        tok = AutoTokenizer.from_pretrained(path)
        assert tok.chat_template == CHATML, name
        model = AutoModelForCausalLM.from_pretrained(path)
        # Built from scratch with the ChatML tokenizer: an embedding row for each added token.
        assert model.get_input_embeddings().weight.shape[0] == len(tok) == 402, name
        # Stock generate stops at the end of the turn, as prefkd's sampling does.
        assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids([end, tok.eos_token]), name

    # What the student sees: ChatML prompts, responses that end with <|im_end|>.
    about, rows = render_records(RenderRun(model=str(out / "plad" / "seed0" / "model"),
                                           data=str(out / "data" / "test.jsonl"), limit=3))
    assert about["end_of_turn"] == [end] and about["stop_tokens"][0] == end
    tok = AutoTokenizer.from_pretrained(str(out / "plad" / "seed0" / "model"))
    for row in rows:
        assert row["prompt"].startswith(f"{start}user\n") and row["prompt"].endswith(f"{end}\n{start}assistant\n")
        assert row["input_ids"][-1] == tok.convert_tokens_to_ids(end) and end not in row["response"]

    # Sample caches (teacher samples for kd, teacher and student pairs for plad) and evaluation samples were drawn
    # from ChatML prompts; the decoded responses and predictions carry no markup.
    caches = sorted((out / "cache").glob("*.jsonl")) + sorted((out / "eval").rglob("samples/*.jsonl"))
    assert {p.name.split("-")[0] for p in caches} == {"teacher", "student", "seed"}
    for path in caches:
        samples = [json.loads(line) for line in path.read_text().splitlines()[1:]]
        assert samples, path
        for s in samples:
            assert s["prompt"].startswith(f"{start}user\n") and s["prompt"].endswith(f"{start}assistant\n"), path
            assert "<|im_" not in s["response"], path
    for row in results["rows"]:
        predictions = (_eval_dir(out, row["name"]) / "predictions.json").read_text()
        assert "<|im_" not in predictions and "<|endoftext|>" not in predictions


def test_compare_with_a_teacher_of_another_tokenizer_and_architecture(tmp_path):
    """`data.teacher_tokenizer.vocab_size`: the teacher (here a Llama) is trained with its own BPE, saved with its
    model, and every later stage reads it in its own tokens: dpkd (bytes), uld (both alignments) and seqkd distil,
    the teacher is evaluated and judges with its tokenizer. The student's stages keep their keys."""
    out = tmp_path / "xtok"
    base = ["compare", f"out={out}", *TINY, "continued_sft=false", "eval.seeds=10"]
    res = CliRunner().invoke(app, [*base, "methods=[seqkd]"])  # the shared-tokenizer experiment first
    assert res.exit_code == 0, res.output
    assert not (out / "data" / "tokenizer_teacher").exists()
    sft_key = json.loads((out / "sft" / "stage.json").read_text())["key"]
    sft_stamp = (out / "sft" / "model" / "model.safetensors").stat().st_mtime_ns

    xtok = ["data.teacher_tokenizer.vocab_size=500", "teacher.arch=llama", "judge.path=teacher", "contrasts=[dpkd]",
            "methods=[dpkd, uld, uld-bytes, seqkd]",
            "variants={uld-bytes: {method: uld, set: [distill.uld.alignment=bytes]}}"]
    res = CliRunner().invoke(app, [*base, *xtok])
    assert res.exit_code == 0, res.output
    assert "teacher tokenizer: 500 tokens" in " ".join(res.output.split())
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ["teacher", "sft", "dpkd", "uld", "uld-bytes", "seqkd"]
    assert "dpkd" in results["rows"][3]["rougeL"]["vs"]
    _check_scores_from_predictions(out, results)

    # The teacher: a Llama with the teacher's tokenizer, which differs from the student's (other merges, other ids).
    student_tok = AutoTokenizer.from_pretrained(str(out / "data" / "tokenizer"))
    teacher_tok = AutoTokenizer.from_pretrained(str(out / "data" / "tokenizer_teacher"))
    assert len(teacher_tok) == 500 and len(student_tok) == 400
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    assert any(s_vocab.get(t) != i for t, i in t_vocab.items())
    text = "Name the town where Baxdor Talton lives."
    assert student_tok(text)["input_ids"] != teacher_tok(text)["input_ids"]
    teacher = AutoModelForCausalLM.from_pretrained(str(out / "teacher" / "model"))
    assert teacher.config.model_type == "llama" and teacher.config.vocab_size == 500
    assert AutoTokenizer.from_pretrained(str(out / "teacher" / "model")).get_vocab() == t_vocab
    # The student and every distilled student keep the student's tokenizer; the SFT student was reused as it was.
    for name in ("sft/model", "dpkd/seed0/model", "uld/seed0/model", "uld-bytes/seed0/model", "seqkd/seed0/model"):
        assert AutoTokenizer.from_pretrained(str(out / name)).get_vocab() == s_vocab, name
    assert json.loads((out / "sft" / "stage.json").read_text())["key"] == sft_key
    assert (out / "sft" / "model" / "model.safetensors").stat().st_mtime_ns == sft_stamp
    # Distillation read the teacher in its own tokens: dpkd normalised by bytes, uld aligned both ways.
    output = " ".join(res.output.split())
    assert "dpkd across tokenizers: the teacher" in output and "uld across tokenizers: the teacher" in output
    config = yaml.safe_load((out / "uld-bytes" / "seed0" / "config.yaml").read_text())
    assert config["distill"]["uld"]["alignment"] == "bytes" and config["teacher"]["path"].endswith("teacher/model")
    log = [json.loads(line) for line in (out / "dpkd" / "seed0" / "train_log.jsonl").read_text().splitlines()]
    assert all("teacher_logp_student" in row and "pref_accuracy" in row for row in log)
    assert all(np.isfinite(row["uld_distance"]) for name in ("uld", "uld-bytes") for row in
               map(json.loads, (out / name / "seed0" / "train_log.jsonl").read_text().splitlines()))
    # The teacher judged every row (a log-likelihood judge in its own tokens) and was evaluated with its tokenizer.
    assert results["judge"] == "teacher"
    for row in results["rows"]:
        settings = json.loads((_eval_dir(out, row["name"]) / "settings.json").read_text())
        assert settings["judge"]["name"] == f"loglik:{out / 'teacher' / 'model'}", row["name"]
        assert np.isfinite(row["judge_score"]["mean"]), row["name"]
    settings = json.loads((_eval_dir(out, "teacher") / "settings.json").read_text())
    assert settings["generation"]["model"] == str(out / "teacher" / "model")

    # A token-level method is refused before any stage, by name, with the methods that work across tokenizers.
    fresh = tmp_path / "refused"
    res = CliRunner().invoke(app, ["compare", f"out={fresh}", *TINY, *xtok[:2], "methods=[dpkd, kd, dpkd-kd]",
                                   "variants={dpkd-kd: {method: dpkd, set: [distill.dpkd.anchor=kd]}}"])
    assert res.exit_code == 2, res.output
    message = " ".join(res.output.split())
    assert "kd (kd compares the two models' distributions over one vocabulary)" in message
    assert "dpkd-kd (distill.dpkd.anchor=kd" in message and "uld" in message and "seqkd" in message
    assert "dpkd (" not in message and "Traceback" not in message
    assert not fresh.exists()
