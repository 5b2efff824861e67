"""The evaluation directory's files: reading predictions back, matching them to records, per-prompt matrices."""

import json

import numpy as np
import pytest

from prefkd.data.records import Instruction
from prefkd.errors import DataError
from prefkd.eval_files import align, per_prompt_matrix, read_predictions, read_responses, write_evaluation
from prefkd.evaluate import breakdown, prompt_scores

RECS = [Instruction("q1", references=("teal",), kind="D", id="a"),
        Instruction("q2", references=("red sky",), kind="skill", id="b")]


def _write(out, preds):
    scores = prompt_scores(RECS, preds)
    write_evaluation(out, RECS, preds, breakdown(RECS, scores), scores, {"seeds": list(preds)})


def test_align_by_id_or_position():
    rows = [{"id": "b", "prediction": "B"}, {"id": "a", "prediction": "A"}]
    assert align(RECS, rows, "f") == ["A", "B"]
    with pytest.raises(DataError, match="1 of 2 records have no prediction \\(first id 'b'\\)"):
        align(RECS, rows[1:], "f")
    assert align(RECS, [{"prediction": "x"}, {"prediction": "y"}], "f") == ["x", "y"]
    with pytest.raises(DataError, match="1 predictions for 2 records and no ids"):
        align(RECS, [{"prediction": "x"}], "f")


def test_round_trip_and_matrices(tmp_path):
    _write(tmp_path / "one", {10: ["teal", "blue"], 20: ["green", "red sky"]})
    _write(tmp_path / "two", {10: ["teal", "red sky"]})
    assert read_predictions(tmp_path / "one") == {10: [{"id": "a", "prediction": "teal"},
                                                       {"id": "b", "prediction": "blue"}],
                                                  20: [{"id": "a", "prediction": "green"},
                                                       {"id": "b", "prediction": "red sky"}]}
    assert read_responses(tmp_path / "one" / "predictions.json", RECS[::-1]) == {10: ["blue", "teal"],
                                                                                 20: ["red sky", "green"]}
    m = per_prompt_matrix([tmp_path / "one", tmp_path / "two"])
    assert m.tolist() == [[50, 50], [100, 100]]  # rows: runs; columns: prompts a, b (seed means)
    assert per_prompt_matrix([tmp_path / "one"], group="kind:skill").tolist() == [[50]]
    assert np.array_equal(per_prompt_matrix([tmp_path / "one"], "exact_match"), [[50, 50]])
    with pytest.raises(DataError, match="no per-prompt 'win_rate'"):
        per_prompt_matrix([tmp_path / "one"], "win_rate")
    with pytest.raises(ValueError, match="no prompt in group 'kind:nope'; groups: \\['all', 'bucket"):
        per_prompt_matrix([tmp_path / "one"], group="kind:nope")
    scores = json.loads((tmp_path / "one" / "scores.json").read_text())
    assert scores["all"]["rougeL"]["per_seed"] == [50, 50]


def test_other_prompts_and_bad_files_are_named(tmp_path):
    _write(tmp_path / "one", {1: ["teal", "blue"]})
    other = [Instruction("q3", references=("x",), id="c")] + RECS[1:]
    scores = prompt_scores(other, {1: ["x", "y"]})
    write_evaluation(tmp_path / "two", other, {1: ["x", "y"]}, breakdown(other, scores), scores, {})
    with pytest.raises(DataError, match="scored on other prompts"):
        per_prompt_matrix([tmp_path / "one", tmp_path / "two"])
    bad = tmp_path / "predictions.json"
    bad.write_text('{"10": [{"id": "a"}]}')
    with pytest.raises(DataError, match="seed 10 row 0"):
        read_predictions(bad)
    bad.write_text("{not json")
    with pytest.raises(DataError, match="malformed JSON"):
        read_predictions(bad)
    with pytest.raises(DataError, match="no predictions file"):
        read_predictions(tmp_path / "missing")
