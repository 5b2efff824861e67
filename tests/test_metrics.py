import pytest

from prefkd.data.records import Instruction
from prefkd.evaluate import exact_match, length_bucket, rouge_l, score


def test_rouge_l_hand_checked():
    assert rouge_l("the cat sat", ["the cat sat"]) == pytest.approx(100)
    # LCS "the cat" = 2, P = 2/3, R = 2/2 -> F = 0.8
    assert rouge_l("the cat ran", ["the cat"]) == pytest.approx(80)
    assert rouge_l("Potters.", ["potter"]) == pytest.approx(100)  # Porter stemmer
    assert rouge_l("dog", ["cat", "dog"]) == pytest.approx(100)  # max over references
    assert rouge_l("", ["cat"]) == 0


def test_exact_match_keeps_articles():
    assert exact_match("  Teal! ", ["teal"]) == 100
    assert exact_match("a teal", ["teal"]) == 0
    assert exact_match("x", ["y", "X."]) == 100


def test_length_buckets():
    assert length_bucket("one two") == "(0,30]"
    assert length_bucket(" ".join(["w"] * 30)) == "(0,30]"
    assert length_bucket(" ".join(["w"] * 31)) == "(30,70]"
    assert length_bucket(" ".join(["w"] * 71)) == "(70,inf]"


def test_score_groups_by_kind_and_seed():
    recs = [Instruction("q1", references=("teal",), kind="D"), Instruction("q2", references=("red",), kind="skill")]
    out = score(recs, {1: ["teal", "blue"], 2: ["blue", "red"]})
    assert out["all"]["rougeL"]["per_seed"] == [50, 50]
    assert out["kind:D"]["rougeL"]["per_seed"] == [100, 0]
    assert out["kind:D"]["rougeL"]["mean"] == 50
