"""Model cards of saved students (prefkd.cards, `prefkd card`) and the upload to the Hub, on tiny local runs."""

import json
import re
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from huggingface_hub import HfApi, ModelCard
from typer.testing import CliRunner

from prefkd import config
from prefkd.cards import HubConfig, model_card, push
from prefkd.cli import app
from prefkd.evaluate import EvalConfig
from prefkd.generation import SamplingConfig
from prefkd.methods import METHODS
from prefkd.recipes.distill import DistillRun
from prefkd.recipes.evaluate import EvaluateRun, run_evaluate

runner = CliRunner()
SECRET = "hf_NotARealTokenButShapedLikeOne1234"


def _sft(out, files, size="nano", extra=()):
    return runner.invoke(app, ["sft", f"out={out}", f"tokenizer={files['tokenizer']}", f"model.size={size}",
                               f"data.train={files['train']}", "train.steps=2", "train.batch_size=4", *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    """A teacher and a student SFT'd from scratch, and the student distilled with kd (distill.kd.temperature=2)."""
    from support import tiny_files

    root = tmp_path_factory.mktemp("cards")
    files = tiny_files(root, tokenizer)
    for name, size in (("teacher", "micro"), ("student", "nano")):
        res = _sft(root / name, files, size)
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, [
        "distill", "--method", "kd", f"out={root / 'kd'}", f"student.path={root / 'student' / 'model'}",
        f"teacher.path={root / 'teacher' / 'model'}", f"data.prompts={files['train']}", f"data.replay={files['train']}",
        f"distill.cache_dir={root / 'cache'}", "distill.kd.temperature=2", "distill.kappa=0.25", "distill.lm_weight=0",
        "sampling.max_new_tokens=6", "sampling.batch_size=4", "train.steps=2", "train.batch_size=4", "train.lr=3e-4"])
    assert res.exit_code == 0, res.output
    return root, files


def _settings(card: ModelCard) -> dict[str, str]:
    """The body's settings table as {key: value}."""
    return dict(re.findall(r"^\| `([^`]+)` \| `([^`]*)` \|$", card.text, flags=re.M))


def test_sft_from_scratch_card_has_no_base_model_and_says_so(runs):
    root, files = runs
    card = ModelCard.load(root / "student" / "model" / "README.md")
    assert card.data.base_model is None and "built from scratch: gpt2 nano" in card.text
    assert card.data.tags == ["distillation", "prefkd", "sft"]
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.datasets is None  # a local file is not a hub dataset
    assert _settings(card) == {"train.lr": "0.0005", "train.steps": "2", "train.batch_size": "4",
                               "train.grad_accum": "1", "train.seed": "0"}
    assert f"- references: `{files['train']}`" in card.text
    assert METHODS["sft"].description in card.text


def test_distill_card_names_method_teacher_student_and_settings(runs):
    root, files = runs
    card = ModelCard.load(root / "kd" / "model" / "README.md")
    kd = METHODS["kd"]
    assert card.data.tags == ["distillation", "prefkd", "kd"]
    assert f"`kd`: {kd.description} ({kd.paper})" in card.text
    assert f"Teacher: `{root / 'teacher' / 'model'}` (white-box" in card.text
    # The local student was built from scratch: no hub base model in the metadata, its path in the body.
    assert card.data.base_model is None and f"local model `{root / 'student' / 'model'}`" in card.text
    settings = _settings(card)
    assert settings["distill.kd.temperature"] == "2.0" and settings["distill.kappa"] == "0.25"
    assert settings["distill.lm_weight"] == "0.0" and settings["train.lr"] == "0.0003"
    assert not any(k.startswith(("distill.dpkd", "distill.plad")) for k in settings)  # other methods' sections
    assert f"- prompts: `{files['train']}`" in card.text and "Results" not in card.text


def test_base_model_and_datasets_are_hub_ids_or_inherited(tmp_path):
    run = config.to_dict(DistillRun(method="dpkd"))
    run["student"]["path"], run["teacher"]["path"] = "openai-community/gpt2", "openai-community/gpt2-xl"
    run["data"]["prompts"] = "databricks/databricks-dolly-15k"
    card = model_card(run)
    assert card.data.base_model == "openai-community/gpt2"
    assert card.data.datasets == ["databricks/databricks-dolly-15k"]
    assert _settings(card)["distill.dpkd.beta"] == "0.1"
    # A local student whose own card names a hub base: the new card names that base.
    local = tmp_path / "sft" / "model"
    local.mkdir(parents=True)
    (local / "README.md").write_text(str(card))
    run["student"]["path"] = str(local)
    assert model_card(run).data.base_model == "openai-community/gpt2"


def test_card_after_evaluation_holds_the_scores_of_scores_json(runs, tmp_path):
    root, files = runs
    eval_dir = tmp_path / "eval"
    cfg = EvaluateRun(model=str(root / "kd" / "model"), data=str(files["test"]), out=str(eval_dir),
                      eval=EvalConfig(seeds=[1, 2], sampling=SamplingConfig(max_new_tokens=6, batch_size=4)))
    run_evaluate(cfg)
    res = runner.invoke(app, ["card", str(root / "kd"), "--eval", str(eval_dir)])
    assert res.exit_code == 0, res.output
    card = ModelCard.load(root / "kd" / "model" / "README.md")
    scores = json.loads((eval_dir / "scores.json").read_text())["all"]
    num = r"(-?[\d.]+)"  # a t interval over two seeds can reach below 0
    row = rf"^\| ([A-Za-z -]+) \| {num} \| {num} \| {num} to {num} \| {num} to {num} \|$"
    rows = {m[0]: m[1:] for m in re.findall(row, card.text, flags=re.M)}
    for label, metric in (("Rouge-L", "rougeL"), ("Exact match", "exact_match")):
        s = scores[metric]
        expected = (s["mean"], s["std"], *s["ci95"], *s["ci95_bootstrap"])
        assert rows[label] == tuple(f"{v:.2f}" for v in expected), label
    results = {(r.metric_type, r.metric_config): r for r in card.data.eval_results}
    assert set(results) == {("rouge", "rougeL"), ("exact_match", None)}
    assert results["rouge", "rougeL"].metric_value == pytest.approx(scores["rougeL"]["mean"], abs=1e-4)
    assert results["exact_match", None].metric_value == pytest.approx(scores["exact_match"]["mean"], abs=1e-4)
    assert results["rouge", "rougeL"].dataset_name == "test.jsonl"
    # Rebuilt without --eval, the card keeps the training part only (and RUN/model/eval is not there to pick up).
    res = runner.invoke(app, ["card", str(root / "kd")])
    assert res.exit_code == 0 and "Results" not in (root / "kd" / "model" / "README.md").read_text()


def test_card_verb_rebuilds_the_card_the_run_wrote(runs):
    root, _ = runs
    path = root / "teacher" / "model" / "README.md"
    written = path.read_text()
    path.unlink()
    res = runner.invoke(app, ["card", str(root / "teacher")])
    assert res.exit_code == 0, res.output
    assert path.read_text() == written


def test_card_verb_refuses_what_is_not_a_run(tmp_path):
    res = runner.invoke(app, ["card", str(tmp_path)])
    assert res.exit_code == 2
    assert res.output.strip() == f"error: {tmp_path}/config.yaml not found: pass the output directory of " \
                                 "`prefkd sft` or `prefkd distill`"


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as huggingface_hub reads it (at import, into constants)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_offline_push_after_sft_is_one_line_and_keeps_the_model(runs, tmp_path, offline):
    _, files = runs
    out = tmp_path / "pushed"
    res = _sft(out, files, extra=["push_to_hub=someone/tiny-student"])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert lines[-1].startswith("error: could not push to the Hub repo someone/tiny-student (OfflineModeIsEnabled")
    assert f"the model is saved in {out / 'model'}" in lines[-1]
    assert f"run `prefkd card {out} --push someone/tiny-student`" in lines[-1]
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "README.md").is_file()
    # The way out the message gives fails the same way while offline, and also in one line.
    res = runner.invoke(app, ["card", str(out), "--push", "someone/tiny-student"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert "could not push to the Hub repo someone/tiny-student" in res.output


@pytest.fixture
def fake_hub(monkeypatch):
    """HfApi's create_repo and upload_folder, recording their arguments (and the folder's files at upload)."""
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        calls.append(("upload_folder", {**kw, "files": sorted(p.name for p in Path(kw["folder_path"]).iterdir())}))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_the_model_dir_with_token_from_the_environment(runs, tmp_path, monkeypatch, fake_hub):
    _, files = runs
    monkeypatch.setenv("MY_HUB_TOKEN", SECRET)
    out = tmp_path / "pushed"
    res = _sft(out, files, extra=["push_to_hub=someone/tiny", "hub.private=true", "hub.token=MY_HUB_TOKEN"])
    assert res.exit_code == 0, res.output
    (create, kw), (upload, up) = fake_hub
    assert create == "create_repo" and upload == "upload_folder"
    assert kw["repo_id"] == "someone/tiny" and kw["private"] is True and kw["exist_ok"] is True
    assert kw["token"] == SECRET and up["token"] == SECRET
    assert up["repo_id"] == "someone/tiny" and up["folder_path"] == str(out / "model")
    assert "README.md" in up["files"] and "model.safetensors" in up["files"]
    saved = (out / "config.yaml").read_text()
    assert SECRET not in saved and yaml.safe_load(saved)["hub"]["token"] == "MY_HUB_TOKEN"
    # Pushing later with `prefkd card`: the run's hub.token names the variable, --public overrides hub.private.
    fake_hub.clear()
    res = runner.invoke(app, ["card", str(out), "--push", "someone/other", "--public"])
    assert res.exit_code == 0, res.output
    assert fake_hub[0][1]["private"] is False and fake_hub[0][1]["token"] == SECRET
    assert fake_hub[1][1]["repo_id"] == "someone/other"
    # Where to upload is not a training setting: the finished run, resumed with push_to_hub, is pushed, not retrained.
    fake_hub.clear()
    log = (out / "train_log.jsonl").read_text()
    res = _sft(out, files, extra=["push_to_hub=someone/third", "hub.token=MY_HUB_TOKEN", "--resume"])
    assert res.exit_code == 0, res.output
    assert [c[1]["repo_id"] for c in fake_hub] == ["someone/third"] * 2
    assert (out / "train_log.jsonl").read_text() == log


def test_push_without_the_token_variable_leaves_the_token_to_the_saved_login(runs, monkeypatch, fake_hub):
    root, _ = runs
    monkeypatch.delenv("HF_TOKEN", raising=False)
    push(root / "student" / "model", "someone/s", HubConfig(), root / "student")
    assert fake_hub[0][1]["token"] is None and fake_hub[0][1]["private"] is False


def test_a_token_given_as_hub_token_or_a_bad_repo_id_is_refused_before_any_work(runs, tmp_path, fake_hub):
    _, files = runs
    res = _sft(tmp_path / "a", files, extra=[f"hub.token={SECRET}", "push_to_hub=someone/x"])
    assert res.exit_code == 2 and "hub.token takes the NAME of an environment variable" in res.output
    assert SECRET not in res.output and not (tmp_path / "a" / "config.yaml").exists()
    res = _sft(tmp_path / "b", files, extra=["push_to_hub=no spaces/allowed"])
    assert res.exit_code == 2 and "is not a Hub repo id" in res.output
    assert not (tmp_path / "b" / "config.yaml").exists() and fake_hub == []


def test_compare_refreshes_each_evaluated_models_card_with_its_results(tmp_path):
    from test_end_to_end import TINY

    out = tmp_path / "demo"
    res = runner.invoke(app, ["demo", "--out", str(out), "--methods", "kd", "continued_sft=false", *TINY])
    assert res.exit_code == 0, res.output
    for name, run in (("teacher", "teacher"), ("sft", "sft"), ("kd", "kd/seed0")):
        card = ModelCard.load(out / run / "model" / "README.md")
        scores = json.loads(next((out / "eval" / "test" / name).glob("*/scores.json")).read_text())["all"]
        (rouge,) = [r for r in card.data.eval_results if r.metric_type == "rouge"]
        assert rouge.metric_value == pytest.approx(scores["rougeL"]["mean"], abs=1e-4), name
        assert f"| Rouge-L | {scores['rougeL']['mean']:.2f} |" in card.text, name
    assert ModelCard.load(out / "kd" / "seed0" / "model" / "README.md").data.tags[-1] == "kd"
