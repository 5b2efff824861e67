"""The papers' recipes under configs/paper run unchanged, with hub model ids replaced by small local models.

They name the real Dolly files (../shared/data), so every test here is marked real_data: what is checked is that
the recipes as shipped prepare the papers' splits from those files."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from prefkd.cli import app
from prefkd.data.loaders import load_instructions
from prefkd.data.records import write_records
from prefkd.models import build_model, save_pretrained, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper"
runner = CliRunner()


def _ok(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Both data recipes on the real Dolly files, into a temporary directory."""
    tmp = tmp_path_factory.mktemp("recipes")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # the recipes name ../shared/data relative to the repository root
        for name in ("dpkd-dolly", "plad-dolly"):
            _ok(["prepare", "--config", str(PAPER / name / "data.yaml"), f"out={tmp / name}"])
    return tmp


@pytest.mark.real_data
def test_data_recipes_make_minillm_splits_on_real_dolly(prepared):
    report = json.loads((prepared / "dpkd-dolly" / "splits.json").read_text())["report"]
    assert report["test"] == 500 and report["validation"] == 1000 and report["removed"] == 1503
    assert report["train"] + report["short_responses_removed"] == 15015 - 1503
    assert report["corpus_documents"] > 10
    plad = json.loads((prepared / "plad-dolly" / "splits.json").read_text())["report"]
    assert abs(plad["d0"] - plad["d"]) <= 1 and plad["d0"] + plad["d"] == plad["train"]
    prompts = load_instructions(prepared / "plad-dolly" / "d_prompts.jsonl", require_references=False)
    assert all(not r.references for r in prompts)


@pytest.mark.real_data
@pytest.mark.parametrize("recipe", ["dpkd-dolly", "plad-dolly"])
def test_training_recipes_run_with_small_models_on_real_dolly(prepared, recipe, tmp_path):
    data_yaml = yaml.safe_load((PAPER / recipe / "data.yaml").read_text())
    data_dir = prepared / recipe
    # Every data file a recipe names is one its data recipe writes.
    for name in ("teacher-sft", "student-sft", "distill"):
        cfg = yaml.safe_load((PAPER / recipe / f"{name}.yaml").read_text())
        for key, value in cfg.get("data", {}).items():
            assert value.startswith(data_yaml["out"] + "/"), (name, key, value)
            assert (data_dir / Path(value).name).is_file(), (name, key, value)
    # Small stand-ins for gpt2-xl and gpt2, sharing a tokenizer trained on the prepared data.
    small = {}
    for f in ("train", "d0", "d_prompts", "test"):
        if (data_dir / f"{f}.jsonl").is_file():
            small[f] = tmp_path / f"{f}.jsonl"
            write_records(small[f], load_instructions(data_dir / f"{f}.jsonl", require_references=False)[:24])
    texts = [r.prompt + (r.references[0] if r.references else "")
             for r in load_instructions(small["train"], require_references=False)]
    tok = train_tokenizer(texts * 4, vocab_size=400)
    for role, size in (("teacher", "micro"), ("student", "nano")):
        save_pretrained(build_model("gpt2", size, tok), tok, tmp_path / f"base-{role}")
    fast = ["train.steps=2", "train.batch_size=2", "train.save_every=0", "sampling.max_new_tokens=4"]
    swap = {"data/dolly/train.jsonl": small["train"], "data/dolly-plad/train.jsonl": small["train"],
            "data/dolly-plad/d0.jsonl": small.get("d0"), "data/dolly-plad/d_prompts.jsonl": small.get("d_prompts"),
            "data/dolly/corpus.txt": data_dir / "corpus.txt"}

    def run(verb, name, extra):
        cfg = yaml.safe_load((PAPER / recipe / f"{name}.yaml").read_text())
        data = [f"data.{k}={swap[v]}" for k, v in cfg.get("data", {}).items()]
        args = [verb, "--config", str(PAPER / recipe / f"{name}.yaml"), f"out={tmp_path / name}", *data, *extra]
        return _ok(args + (fast if verb == "distill" else fast[:3]))

    run("sft", "teacher-sft", [f"model.path={tmp_path / 'base-teacher'}"])
    run("sft", "student-sft", [f"model.path={tmp_path / 'base-student'}"])
    models = [f"student.path={tmp_path / 'student-sft' / 'model'}",
              f"teacher.path={tmp_path / 'teacher-sft' / 'model'}", "distill.lm_block_size=16"]
    methods = ["dpkd", "kd", "seqkd"] if recipe == "dpkd-dolly" else ["plad", "plad-margin"]
    for m in methods:
        _ok(["distill", "--config", str(PAPER / recipe / "distill.yaml"), "--method", m, f"out={tmp_path / m}",
             *[f"data.{k}={swap[v]}" for k, v in yaml.safe_load((PAPER / recipe / "distill.yaml").read_text())
               ["data"].items()], *models, *fast])
        assert (tmp_path / m / "model").is_dir()
    if recipe == "dpkd-dolly":
        _ok(["evaluate", "--config", str(PAPER / recipe / "evaluate.yaml"), f"model={tmp_path / 'dpkd' / 'model'}",
             f"data={small['test']}", "eval.seeds=1", "eval.sampling.max_new_tokens=4"])
