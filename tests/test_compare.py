"""`prefkd compare`: the Dolly CPU config runs unchanged with tiny sizes; variants; `prefkd report`.

configs/dolly-cpu.yaml names the real Dolly files and corpora (../shared/data): the tests that run it are marked
real_data and named on_real_dolly."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prefkd.cli import app
from prefkd.errors import ConfigError
from prefkd.eval_files import read_records_of, read_responses
from prefkd.evaluate import rouge_l
from prefkd.recipes.compare import ExperimentConfig, resolve, run_experiment, teacher_win_rates
from prefkd.recipes.distill import DistillRun

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.vocab_size=512", "data.dolly.max_train=80", "data.dolly.max_validation=6", "data.dolly.max_test=10",
         "data.pretrain_corpus=../shared/data/pretrain/tinyshakespeare/input.txt", "pretrain_block_size=64",
         "teacher.size=micro", "student.size=nano", "teacher_pretrain.steps=2", "student_pretrain.steps=2",
         "teacher_train.steps=3", "student_train.steps=2", "distill_train.steps=2", "distill_train.batch_size=4",
         "sampling.max_new_tokens=6", "eval.seeds=10", "eval.sampling.max_new_tokens=6", "diagnostics.prompts=2",
         "bootstrap=100", "distill.lm_block_size=32"]


@pytest.mark.real_data
def test_dolly_cpu_config_runs_with_tiny_sizes_on_real_dolly(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config names ../shared/data relative to the repository root
    out = tmp_path / "dolly"
    res = CliRunner().invoke(app, ["compare", "--config", "configs/dolly-cpu.yaml", f"out={out}", "tag=t", *SMALL,
                                   "workers=1", "seeds=[0]"])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results-t.json").read_text())
    names = [r["name"] for r in results["rows"]]
    assert names == ["teacher", "sft", "sft_continued", "kd", "seqkd", "rkl", "gkd", "akl", "dpkd", "plad"]
    # T-S WR from the saved predictions, recomputed here with Rouge-L against the references.
    records = read_records_of(out / "eval" / "test" / "teacher" / "model")
    teacher = read_responses(out / "eval" / "test" / "teacher" / "model", records)[10]
    sft = read_responses(out / "eval" / "test" / "sft" / "model", records)[10]
    wins = []
    for r, t, s in zip(records, teacher, sft, strict=True):
        a, b = rouge_l(t, r.references), rouge_l(s, r.references)
        wins.append(50.0 if t.strip() == s.strip() or a == b else 100.0 * (a > b))
    by = {r["name"]: r for r in results["rows"]}
    assert results["ts_judge"] == "rouge" and "ts_win_rate" not in by["teacher"]
    assert by["sft"]["ts_win_rate"]["mean"] == pytest.approx(sum(wins) / len(wins))
    assert results["n_prompts"] == 10 and results["split"] == "test"
    # Dolly has no `kind`; the length buckets are there.
    assert any(g.startswith("bucket:") for g in results["rows"][0]["breakdown"])
    for stage in ("teacher_pretrain", "sft_pretrain", "teacher", "sft"):
        assert (out / stage / "stage.json").is_file(), stage
    # The student SFTs on D0 only and never sees D's references.
    d0 = {json.loads(line)["instruction"] for line in (out / "data" / "d0.jsonl").read_text().splitlines()}
    d = [json.loads(line) for line in (out / "data" / "d_prompts.jsonl").read_text().splitlines()]
    assert d and all(r["references"] == [] for r in d) and not d0 & {r["instruction"] for r in d}
    (out / "report-t.md").unlink()
    res = CliRunner().invoke(app, ["report", str(out), "--tag", "t"])
    assert res.exit_code == 0, res.output
    report = (out / "report-t.md").read_text()
    assert "| plad |" in report and "T-S WR" in report and (out / "report-t.html").is_file()
    assert (out / "plots-t" / "rouge_by_length.png").is_file()


def test_variants_apply_their_overrides_and_bad_ones_are_named():
    cfg = ExperimentConfig(variants={"dpkd-paper": {"method": "dpkd", "set": ["distill.kappa=1", "distill.replay=0",
                                                                              "train.lr=1e-4"]}})
    base = DistillRun(out="x", method="dpkd")
    run = resolve(cfg, "dpkd-paper", base)
    assert (run.method, run.distill.kappa, run.distill.replay, run.train.lr) == ("dpkd", 1.0, 0.0, 1e-4)
    assert run.distill.lm_weight == base.distill.lm_weight  # untouched keys keep the base run's values
    assert resolve(cfg, "kd", base).method == "kd"
    with pytest.raises(ConfigError, match="neither a method"):
        resolve(cfg, "dpkd-papr", base)
    with pytest.raises(ConfigError, match="needs 'method'"):
        resolve(ExperimentConfig(variants={"v": {"method": "nope"}}), "v", base)
    with pytest.raises(ConfigError, match="distill.kapa"):
        resolve(ExperimentConfig(variants={"v": {"method": "kd", "set": ["distill.kapa=1"]}}), "v", base)


def test_report_verb_rebuilds_and_names_a_missing_results_file(tmp_path):
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "results.json not found" in " ".join(res.output.split())


@pytest.mark.slow
@pytest.mark.real_data
def test_parallel_workers_give_the_runs_of_one_process_on_real_dolly(tmp_path, monkeypatch):
    """workers=2 (spawned processes, one thread each) trains and scores exactly what one process does."""
    import torch

    monkeypatch.chdir(ROOT)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the workers get 2 // 2 = 1 thread each; the sequential run below gets 1 too
    try:
        common = ["--config", "configs/dolly-cpu.yaml", *SMALL, "methods=[seqkd, dpkd]", "seeds=[0, 1]", "contrasts=[]"]
        res = CliRunner().invoke(app, ["compare", *common, f"out={tmp_path / 'par'}", "workers=2"])
        assert res.exit_code == 0, res.output
        assert "jobs on 2 workers x 1 threads" in " ".join(res.output.split())
        torch.set_num_threads(1)
        res = CliRunner().invoke(app, ["compare", *common, f"out={tmp_path / 'seq'}", "workers=1"])
        assert res.exit_code == 0, res.output
    finally:
        torch.set_num_threads(threads)
    par, seq = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("par", "seq"))
    assert par["workers"] == 2 and seq["workers"] == 1
    assert [r["name"] for r in par["rows"]] == ["teacher", "sft", "sft_continued", "seqkd", "dpkd"]
    for a, b in zip(par["rows"], seq["rows"], strict=True):
        assert a["rougeL"]["per_run"] == b["rougeL"]["per_run"], a["name"]
    logs = sorted(p.name for p in (tmp_path / "par" / "logs").iterdir())
    assert "dpkd_seed1.log" in logs and "eval_seqkd_seed0.log" in logs
    # The cache the two seqkd runs share was sampled once per seed, before the workers started.
    assert len(list((tmp_path / "par" / "cache").glob("teacher-*.jsonl"))) == 2


def test_contrasts_add_paired_differences_and_verdicts(tmp_path):
    import numpy as np

    from prefkd.data.records import Instruction
    from prefkd.recipes.compare import summarize
    from prefkd.report import write_report

    rng = np.random.default_rng(0)
    records = [Instruction(f"q{i}", references=("a b c",), kind="D" if i % 2 else "skill") for i in range(40)]
    base = rng.uniform(0, 60, size=40)

    def rows(shift, runs):  # [runs, eval seeds, prompts]
        return np.stack([np.stack([base + shift + rng.normal(0, 2, 40) for _ in range(2)]) for _ in range(runs)])

    scores = {name: {"rougeL": rows(shift, runs), "exact_match": rows(shift, runs) / 2}
              for name, shift, runs in (("teacher", 30, 1), ("sft", 0, 1), ("kd", 10, 2), ("dpkd", 16, 2))}
    cfg = ExperimentConfig(methods=["kd", "dpkd"], contrasts=["kd"], bootstrap=300)
    results = summarize(scores, records, cfg)
    by = {r["name"]: r for r in results["rows"]}
    vs_kd = by["dpkd"]["rougeL"]["vs"]["kd"]
    assert vs_kd["diff"] == pytest.approx(scores["dpkd"]["rougeL"].mean() - scores["kd"]["rougeL"].mean())
    assert vs_kd["significant"] and vs_kd["ci95"][0] > 0
    assert "kd" not in by["kd"]["rougeL"]["vs"] and "kd" in by["sft"]["rougeL"]["vs"]
    assert "kd" not in by["teacher"]["rougeL"].get("vs", {})
    results.update(tag="", wall_seconds=1)
    write_report(tmp_path, results)
    text = (tmp_path / "report.md").read_text()
    assert "## Against kd (paired on prompts)" in text and "- dpkd beat kd overall" in text
    with pytest.raises(ConfigError, match="not rows of this comparison"):
        run_experiment(ExperimentConfig(out=str(tmp_path / "x"), methods=["dpkd"], contrasts=["kdd"]))


def test_the_report_shows_the_comparisons_own_first_seed(tmp_path):
    """An output directory shared by several comparisons holds seed0 of another one: the report's diagnostics and
    training curves come from this comparison's first training seed (3), not from the lowest seed on disk."""
    import json

    from prefkd.report import diagnostics_logs, first_run

    for seed, reward in ((0, -0.5), (3, 0.25)):
        d = tmp_path / "dpkd" / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "diagnostics.jsonl").write_text(json.dumps({"step": 10, "heldout_reward_teacher": reward}) + "\n")
    results = {"train_seeds": [3, 4]}
    assert diagnostics_logs(tmp_path, ["dpkd", "kd"], results) == {
        "dpkd": [{"step": 10, "heldout_reward_teacher": 0.25}]}
    assert first_run(tmp_path, "dpkd", results, "train_log.jsonl") is None


def test_teacher_win_rates_pair_each_eval_seed_with_the_teachers():
    import numpy as np

    # One prompt per column; the teacher has one run, the student two, both two eval seeds.
    teacher = np.array([[[3.0, 1.0, 2.0], [0.0, 5.0, 2.0]]])
    student = np.array([[[1.0, 1.0, 4.0], [1.0, 1.0, 1.0]], [[3.0, 0.0, 2.0], [0.0, 0.0, 9.0]]])
    texts = {"teacher": [{10: ["a", "b", "c"], 20: ["d", "e", "f"]}],
             "s": [{10: ["x", "y", "z"], 20: ["d", "q", "r"]}, {10: ["x", "y", "z"], 20: ["u", "v", "w"]}]}
    ts = teacher_win_rates({"teacher": teacher, "s": student}, texts)
    assert set(ts) == {"s"}
    # run 0: seed 10 -> win 100 (3>1), tie 50, loss 0; seed 20 -> same text "d" = tie, 100, 100
    # run 1: seed 10 -> tie (3=3), 100, tie (2=2); seed 20 -> tie (0=0), 100, 0
    assert ts["s"].tolist() == [[[100, 50, 0], [50, 100, 100]], [[50, 100, 50], [50, 100, 0]]]
    loose = teacher_win_rates({"teacher": teacher, "s": student}, texts, tie_tolerance=2.0)
    assert loose["s"][0, 0].tolist() == [50, 50, 50]  # |3-1|, 0 and |2-4| are all within 2
    assert teacher_win_rates({"s": student}, {"s": texts["s"]}) == {}


def test_compare_evaluates_every_model_on_a_conversations_file_in_the_chat_format(tmp_path):
    """eval_split=FILE: each model answers the last user turn of multi-turn conversations in its chat template, and
    is scored against the last assistant turn."""
    from test_end_to_end import TINY

    chats = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": f"Who is {n}?"},
                          {"role": "assistant", "content": f"{n} is a person."},
                          {"role": "user", "content": "And what does she do?"},
                          {"role": "assistant", "content": f"{n} writes books."}]} for n in ("Ada", "Bea", "Cy")]
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--methods", "kd", *TINY, "continued_sft=false",
                                   "eval.seeds=10", "data.template=chat", f"eval_split={chats}"])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert {r["name"] for r in results["rows"]} == {"teacher", "sft", "kd"}
    assert all(r["breakdown"]["all"]["n"] == 3 for r in results["rows"])
    samples = (out / "eval" / "file-chats" / "kd" / "seed0" / "samples" / "seed-10.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["prompt"] for line in samples[1:]]
    assert prompts[0].startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWho is")
    assert prompts[0].endswith("And what does she do?<|im_end|>\n<|im_start|>assistant\n")
    records = read_records_of(out / "eval" / "file-chats" / "kd" / "seed0")
    assert [r.references for r in records] == [(f"{n} writes books.",) for n in ("Ada", "Bea", "Cy")]
