"""`prefkd evaluate` and `prefkd winrate` on tiny local models: files, settings, re-scoring, resuming, judges."""

import json
from dataclasses import replace

import numpy as np
import pytest
from support import save_gpt2_reward_model, save_lm, tiny_files
from transformers import AutoTokenizer
from typer.testing import CliRunner

from prefkd.cache import read_cache
from prefkd.cli import app
from prefkd.data.loaders import load_instructions
from prefkd.data.records import write_records
from prefkd.eval_files import per_prompt_matrix, read_predictions, read_responses
from prefkd.evaluate import score
from prefkd.judges import LogLikelihoodJudge, RewardModelJudge, head_to_head

FAST = ["eval.sampling.max_new_tokens=8", "eval.sampling.batch_size=4"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("eval")
    files = tiny_files(root, tokenizer)
    return {"root": root, "test": str(files["test"]), "train": str(files["train"]),
            "student": save_lm(root / "student", tokenizer, "nano", seed=1),
            "teacher": save_lm(root / "teacher", tokenizer, "micro", seed=2),
            "rm": save_gpt2_reward_model(root / "rm", tokenizer)}


def _ok(args):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())  # the console wraps long lines


def _json(path):
    return json.loads(path.read_text())


def test_evaluate_writes_every_setting_scores_and_predictions(setup, tmp_path):
    out = tmp_path / "ev"
    text = _ok(["evaluate", "--model", setup["student"], "--data", setup["test"], "--seeds", "1,2", "--out", str(out),
                *FAST])
    assert "temperature 1.0, top_k 0, top_p 1.0, max_new_tokens 8, no_repeat_ngram_size 6, batch_size 4" in text
    records = load_instructions(setup["test"])
    settings = _json(out / "settings.json")
    gen = settings["generation"]
    assert gen["seeds"] == [1, 2] and settings["seeds"] == [1, 2]
    assert gen["sampling"] == {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": 8,
                               "no_repeat_ngram_size": 6, "batch_size": 4}
    assert gen["model"] == setup["student"] and gen["model_identity"].startswith(setup["student"] + "@")
    assert settings["n_records"] == len(records)
    # The share of samples that stopped at EOS, recomputed from the sampled ids the caches keep (both seeds).
    eos = AutoTokenizer.from_pretrained(setup["student"]).eos_token_id
    ended = [row["response_ids"][-1:] == [eos] for seed in (1, 2)
             for row in read_cache(out / "samples" / f"seed-{seed}.jsonl")[1]]
    assert gen["ended_with_eos"] == pytest.approx(sum(ended) / len(ended), abs=1e-4)
    assert "use_stemmer=True" in settings["protocol"]["rougeL"] and settings["judge"] is None
    # predictions: one list per seed, in record order, with the records' ids
    preds = read_predictions(out)
    assert list(preds) == [1, 2] and [row["id"] for row in preds[1]] == [r.id for r in records]
    # scores.json: groups -> n + metric summaries, recomputable from the saved predictions
    scores = _json(out / "scores.json")
    assert {"all", "kind:D", "bucket:(0,30]"} <= set(scores)
    s = scores["all"]["rougeL"]
    assert set(s) == {"mean", "std", "per_seed", "ci95", "ci95_bootstrap"} and len(s["per_seed"]) == 2
    assert scores["all"]["n"] == len(records)
    again = score(records, {k: [r["prediction"] for r in v] for k, v in preds.items()})
    assert again["all"]["rougeL"]["per_seed"] == pytest.approx(s["per_seed"])
    # per-prompt scores ([seed][prompt]) feed the bootstraps
    ps = _json(out / "prompt_scores.json")
    assert ps["ids"] == [r.id for r in records] and ps["seeds"] == [1, 2]
    assert np.array(ps["rougeL"]).shape == (2, len(records)) and set(ps) == {"ids", "seeds", "rougeL", "exact_match"}
    assert np.mean(ps["rougeL"], axis=1).tolist() == pytest.approx(s["per_seed"])
    assert per_prompt_matrix([out]).shape == (1, len(records))
    assert per_prompt_matrix([out, out], "exact_match", "kind:D").shape == (2, scores["kind:D"]["n"])
    assert "_git_commit" in (out / "config.yaml").read_text()
    # the samples behind the predictions stay as keyed caches
    header, cache_rows = read_cache(out / "samples" / "seed-2.jsonl")
    assert [r["response"] for r in cache_rows] == [r["prediction"] for r in preds[2]]


def test_key_value_form_still_works_and_sampling_is_deterministic(setup, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _ok(["evaluate", "--model", setup["student"], "--data", setup["test"], "--seeds", "3", "--out", str(a), *FAST])
    _ok(["evaluate", f"model={setup['student']}", f"data={setup['test']}", "eval.seeds=3", f"out={b}", *FAST])
    assert read_predictions(a) == read_predictions(b)
    assert _json(a / "scores.json") == _json(b / "scores.json")


def test_rescore_without_generating_and_with_a_judge(setup, tmp_path):
    out = tmp_path / "ev"
    _ok(["evaluate", "--model", setup["student"], "--data", setup["test"], "--seeds", "1,2", "--out", str(out),
         *FAST])
    # plain re-score into another directory: no model, same scores
    _ok(["evaluate", "--rescore", str(out), "--out", str(tmp_path / "re")])
    assert _json(tmp_path / "re" / "scores.json") == _json(out / "scores.json")
    assert _json(tmp_path / "re" / "settings.json")["generation"]["rescored_from"] == str(out)
    assert _json(tmp_path / "re" / "settings.json")["generation"]["sampling"]["max_new_tokens"] == 8
    # re-score in place with a reward-model judge: win rates appear next to Rouge-L
    records = load_instructions(setup["test"])
    assert all(len(r.references) == 1 for r in records)  # so the best reference is the only one
    _ok(["evaluate", "--rescore", str(out), "--judge", setup["rm"], "judge.batch_size=4"])
    scores = _json(out / "scores.json")
    assert scores["all"]["rougeL"] == _json(tmp_path / "re" / "scores.json")["all"]["rougeL"]
    wr = scores["all"]["win_rate"]
    assert len(wr["per_seed"]) == 2 and "judge_score" in scores["kind:D"]
    ps = _json(out / "prompt_scores.json")
    # Each prompt's win recomputed from the saved reward-model scores: response above the best reference 100,
    # below 0, equal (or the same text) 50.
    score, ref = np.array(ps["judge_score"]), np.array(ps["judge_reference"])
    wins = np.where(score > ref, 100.0, np.where(score < ref, 0.0, 50.0))
    preds = read_predictions(out)
    for i, seed in enumerate(ps["seeds"]):
        for j, (row, r) in enumerate(zip(preds[seed], records, strict=True)):
            if row["prediction"].strip() == r.references[0].strip():
                wins[i, j] = 50.0
    assert ps["win_rate"] == wins.tolist()
    assert wr["per_seed"] == pytest.approx(wins.mean(axis=1).tolist())
    assert set(np.ravel(ps["win_rate"])) <= {0.0, 50.0, 100.0} and len(ps["judge_reference"]) == len(ps["ids"])
    assert np.mean(ps["win_rate"]) == pytest.approx(wr["mean"])
    assert per_prompt_matrix([out], "win_rate").mean() == pytest.approx(wr["mean"])
    settings = _json(out / "settings.json")
    assert settings["judge"]["name"] == f"reward-model:{setup['rm']}" and "0.5" in settings["win_rate_rule"]
    # predictions.json can also be passed alone, with data= naming the records
    _ok(["evaluate", "--rescore", str(out / "predictions.json"), "--data", setup["test"], "--out",
         str(tmp_path / "re2")])
    assert _json(tmp_path / "re2" / "scores.json")["all"]["rougeL"] == scores["all"]["rougeL"]


def test_interrupted_evaluation_resumes_to_the_same_predictions(setup, tmp_path):
    out = tmp_path / "ev"
    args = ["evaluate", "--model", setup["student"], "--data", setup["test"], "--seeds", "1,2", "--out", str(out),
            *FAST, "eval.sampling.batch_size=2"]
    _ok(args)
    before = read_predictions(out)
    # as if killed during seed 2: scores never written, the cache holds its header and the first batch only
    (out / "scores.json").unlink()
    cache = out / "samples" / "seed-2.jsonl"
    cache.write_text("".join(cache.read_text().splitlines(keepends=True)[:3]))
    _ok(args)
    assert read_predictions(out) == before


def test_minillm_format_gives_category_breakdowns(setup, tmp_path):
    records = load_instructions(setup["test"])[:4]
    topics = ["open_qa", "open_qa", "brainstorming", "classification"]
    path = tmp_path / "minillm.jsonl"
    path.write_text("".join(json.dumps({"instruction": r.instruction, "input": r.input, "output": r.references[0],
                                        "prompt": r.prompt, "topic": t}) + "\n" for r, t in zip(records, topics,
                                                                                             strict=True)))
    out = tmp_path / "ev"
    _ok(["evaluate", "--model", setup["student"], "--data", str(path), "--seeds", "1", "--out", str(out), *FAST])
    scores = _json(out / "scores.json")
    assert scores["category:open_qa"]["n"] == 2 and scores["category:classification"]["n"] == 1
    assert [r.id for r in load_instructions(out / "records.jsonl")] == [f"minillm.jsonl:{i}" for i in range(1, 5)]


def test_evaluate_errors_are_one_line(setup, tmp_path):
    def fails(args):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        return " ".join(res.output.split())

    assert "set model=" in fails(["evaluate", "--data", setup["test"]])
    assert "no records.jsonl in this evaluation directory" in fails(["evaluate", "--rescore", str(tmp_path)])
    write_records(tmp_path / "records.jsonl", load_instructions(setup["test"]))
    assert "predictions.json: no predictions file" in fails(["evaluate", "--rescore", str(tmp_path)])
    # a judge that needs the references cannot judge them; said before any generation
    text = fails(["evaluate", "--model", setup["student"], "--data", setup["test"], "--judge", "rouge", "--out",
                  str(tmp_path / "x"), "--seeds", "1", *FAST])
    assert "cannot judge a response against the references" in text and not (tmp_path / "x").exists()


def test_winrate_between_evaluations_and_between_models(setup, tmp_path):
    ev_t, ev_s = tmp_path / "t", tmp_path / "s"
    for model, out in ((setup["teacher"], ev_t), (setup["student"], ev_s)):
        _ok(["evaluate", "--model", model, "--data", setup["test"], "--seeds", "1,2", "--out", str(out), *FAST])
    result_file = tmp_path / "tswr.json"
    text = _ok(["winrate", "--a", str(ev_t), "--b", str(ev_s), "--data", setup["test"], "--judge", setup["teacher"],
                "--out", str(result_file)])
    assert "win rate of A over B" in text
    got = _json(result_file)
    # the same numbers from the library calls
    records = load_instructions(setup["test"])
    direct = head_to_head(LogLikelihoodJudge(setup["teacher"]), records, read_responses(ev_t, records),
                          read_responses(ev_s, records))
    assert got["win_rate"]["per_seed"] == pytest.approx(direct["win_rate"].mean(axis=1).tolist())
    assert got["judge"] == f"loglik:{setup['teacher']}" and got["n"] == len(records)
    assert len(got["per_prompt"]) == len(records)

    # models on prompts without references (a distillation set), sampled here, judged by a reward model
    prompts = tmp_path / "d_prompts.jsonl"
    write_records(prompts, [replace(r, references=()) for r in load_instructions(setup["train"])[:5]])
    out2 = tmp_path / "models.json"
    _ok(["winrate", "--a", setup["teacher"], "--b", setup["student"], "--data", str(prompts), "--judge", setup["rm"],
         "--out", str(out2), "eval.seeds=4", "eval.sampling.max_new_tokens=6"])
    got2 = _json(out2)
    assert got2["n"] == 5 and got2["seeds_a"] == [4]
    # The same number from the library call on the samples kept next to the result.
    samples = {side: [row["response"] for row in read_cache(tmp_path / "models-samples" / side / "seed-4.jsonl")[1]]
               for side in ("a", "b")}
    p_recs = load_instructions(str(prompts), require_references=False)
    direct2 = head_to_head(RewardModelJudge(setup["rm"]), p_recs, {4: samples["a"]}, {4: samples["b"]})
    assert got2["win_rate"]["mean"] == pytest.approx(direct2["win_rate"].mean())
    assert (tmp_path / "models-samples" / "a" / "seed-4.jsonl").is_file()  # samples kept next to the result
    # a sample cache (prefkd generate) is accepted as one side, matched by id
    cache = tmp_path / "models-samples" / "b" / "seed-4.jsonl"
    out3 = tmp_path / "cache.json"
    _ok(["winrate", "--a", setup["teacher"], "--b", str(cache), "--data", str(prompts), "--judge", setup["rm"],
         "--out", str(out3), "eval.seeds=4", "eval.sampling.max_new_tokens=6"])
    assert _json(out3)["win_rate"] == got2["win_rate"]


def test_prompts_without_references_load_only_when_allowed(tmp_path):
    dolly = tmp_path / "d.jsonl"
    dolly.write_text(json.dumps({"instruction": "Say hi.", "context": "", "response": "", "category": "open_qa"})
                     + "\n")
    with pytest.raises(Exception, match="empty response"):
        load_instructions(str(dolly))
    (rec,) = load_instructions(str(dolly), require_references=False)
    assert rec.references == () and rec.category == "open_qa" and rec.id == "d.jsonl:1"
