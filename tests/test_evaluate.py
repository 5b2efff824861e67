import math

import numpy as np
import pytest
from rouge_score import rouge_scorer

from prefkd.data.records import Instruction
from prefkd.evaluate import (
    breakdown,
    exact_match,
    groups,
    length_bucket,
    prompt_scores,
    rouge_l,
    rouge_tokens,
    score,
    summarize,
    unscorable,
)


def test_rouge_l_hand_checked():
    assert rouge_l("the cat sat", ["the cat sat"]) == pytest.approx(100)
    # LCS "the cat" = 2, P = 2/3, R = 2/2 -> F = 0.8
    assert rouge_l("the cat ran", ["the cat"]) == pytest.approx(80)
    # LCS the,cat,on,the,mat = 5 of 6 tokens on both sides -> F = 5/6
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(500 / 6)
    assert rouge_l("Potters.", ["potter"]) == pytest.approx(100)  # Porter stemmer, punctuation dropped
    # Stems: running -> run, dogs -> dog, runs -> run; "the"/"dog" (<= 3 chars) are not stemmed.
    # pred [run, dog], ref [the, dog, run]: LCS 1, P 1/2, R 1/3 -> F 0.4
    assert rouge_tokens("running dogs") == ["run", "dog"]
    assert rouge_l("running dogs", ["the dog runs"]) == pytest.approx(40)


def test_rouge_l_max_over_references():
    assert rouge_l("dog", ["cat", "dog"]) == pytest.approx(100)
    # ref "a x": LCS 1, P 1/4, R 1/2 -> F 1/3; ref "a b c": LCS 3, P 3/4, R 1 -> F 6/7; the max wins
    assert rouge_l("a b c d", ["a x", "a b c"]) == pytest.approx(600 / 7)
    assert rouge_l("a b c d", ["a x"]) == pytest.approx(100 / 3)


def test_rouge_l_empty_strings():
    assert rouge_l("", ["cat"]) == 0  # rouge_score: no tokens on one side -> 0
    assert rouge_l("cat", [""]) == 0
    assert rouge_l("", [""]) == 0  # even two empty strings: F is 0, not 1
    assert rouge_l("...", ["cat"]) == 0  # punctuation only = no tokens
    with pytest.raises(ValueError, match="non-empty list"):
        rouge_l("cat", [])
    with pytest.raises(ValueError, match="non-empty list"):
        rouge_l("cat", "cat")  # a bare string is not a list of references


def test_rouge_l_non_ascii_follows_the_protocol():
    # rouge_score's default tokenizer keeps [a-z0-9] only: "café" -> "caf", "naïve" -> "na", "ve".
    assert rouge_tokens("café au lait") == ["caf", "au", "lait"]
    assert rouge_tokens("naïve") == ["na", "ve"]
    # [caf, au, lait] vs [cafe, au, lait] ("cafe" keeps its e under Porter): LCS 2 of 3 -> 2/3
    assert rouge_l("café au lait", ["cafe au lait"]) == pytest.approx(200 / 3)
    assert rouge_l("café", ["café"]) == pytest.approx(100)  # same mangling on both sides
    # Text without an ASCII letter or digit has no tokens: identical Chinese strings score 0 under the protocol.
    assert rouge_tokens("日本語") == []
    assert rouge_l("日本語", ["日本語"]) == 0
    assert rouge_l("日本語 text", ["text"]) == pytest.approx(100)
    recs = [Instruction("q", references=("日本語",)), Instruction("q", references=("日本語", "yes")),
            Instruction("q", references=("fine",))]
    assert unscorable(recs) == 1


def test_rouge_l_equals_minillm_compute_metrics():
    """MiniLLM's rouge_metric.py: RougeScorer(['rougeL'], use_stemmer=True).score(prediction=p, target=g), max over
    the ground truths, mean over prompts, x100. Recomputed here call by call."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    preds = ["The quick brown fox jumps.", "", "Paris is the capital", "1, 2 and 3", "Ängström units"]
    golds = [["a quick brown dog jumped", "the fox"], ["nothing"], ["The capital of France is Paris."],
             ["1 2 3"], ["angstrom units are small"]]
    theirs = 100 * np.mean([max(scorer.score(prediction=p, target=g)["rougeL"].fmeasure for g in gs)
                            for p, gs in zip(preds, golds, strict=True)])
    ours = np.mean([rouge_l(p, gs) for p, gs in zip(preds, golds, strict=True)])
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_exact_match_keeps_articles():
    assert exact_match("  Teal! ", ["teal"]) == 100
    assert exact_match("a teal", ["teal"]) == 0  # articles are kept
    assert exact_match("x", ["y", "X."]) == 100  # max over references
    assert exact_match("The  Cat.", ["the cat"]) == 100
    assert exact_match("Café", ["café"]) == 100  # lowercasing is Unicode-aware
    assert exact_match("café", ["cafe"]) == 0  # accents are not stripped
    assert exact_match("“teal”", ["teal"]) == 0  # curly quotes are not in string.punctuation
    assert exact_match("", [""]) == 100  # SQuAD normalisation: two empty strings match
    assert exact_match("", ["cat"]) == 0
    with pytest.raises(ValueError):
        exact_match("x", [])


def test_length_buckets():
    assert length_bucket("one two") == "(0,30]"
    assert length_bucket(" ".join(["w"] * 30)) == "(0,30]"
    assert length_bucket(" ".join(["w"] * 31)) == "(30,70]"
    assert length_bucket(" ".join(["w"] * 70)) == "(30,70]"
    assert length_bucket(" ".join(["w"] * 71)) == "(70,inf]"
    assert length_bucket("") == "(0,30]"


def test_score_groups_by_kind_and_seed():
    recs = [Instruction("q1", references=("teal",), kind="D"), Instruction("q2", references=("red",), kind="skill")]
    out = score(recs, {1: ["teal", "blue"], 2: ["blue", "red"]})
    assert out["all"]["rougeL"]["per_seed"] == [50, 50]
    assert out["kind:D"]["rougeL"]["per_seed"] == [100, 0]
    assert out["kind:D"]["rougeL"]["mean"] == 50
    assert out["all"]["rougeL"]["std"] == 0 and out["all"]["rougeL"]["ci95"] == [50, 50]


def test_groups_by_category_and_bucket():
    long = " ".join(["w"] * 40)
    recs = [Instruction("a", references=("x",), category="open_qa", id="1"),
            Instruction("b", references=(long,), category="summarization", id="2"),
            Instruction("c", references=("y",), category="open_qa", id="3")]
    g = groups(recs)
    assert g == {"all": [0, 1, 2], "category:open_qa": [0, 2], "category:summarization": [1],
                 "bucket:(0,30]": [0, 2], "bucket:(30,70]": [1]}


def test_summarize_hand_checked():
    # per-seed means 100, 0, 50: mean 50, std 50, t(0.975, 2) = 4.302653 -> half width 4.302653 * 50 / sqrt(3)
    m = np.array([[100.0, 100.0], [0.0, 0.0], [50.0, 50.0]])
    s = summarize(m)
    assert s["per_seed"] == [100, 0, 50] and s["mean"] == 50 and s["std"] == pytest.approx(50)
    half = 4.302652729911275 * 50 / math.sqrt(3)
    assert s["ci95"] == pytest.approx([50 - half, 50 + half])
    lo, hi = s["ci95_bootstrap"]
    assert 0 <= lo <= 50 <= hi <= 100
    one = summarize(np.array([[10.0, 30.0]]))
    assert one["std"] == 0 and one["ci95"] == [20, 20]


def test_prompt_scores_and_extra_metrics():
    recs = [Instruction("q1", references=("teal",), kind="D", id="a"),
            Instruction("q2", references=("red",), category="c", id="b")]
    preds = {10: ["teal", "red"], 20: ["blue", "red"]}
    scores = prompt_scores(recs, preds)
    assert scores["rougeL"].tolist() == [[100, 100], [0, 100]]  # [seeds, prompts]
    assert score(recs, preds, scores) == score(recs, preds)
    # breakdown adds any extra metric matrix with the same summary shape
    out = breakdown(recs, {**scores, "win_rate": np.array([[100.0, 50.0], [0.0, 50.0]])})
    assert out["all"]["win_rate"]["per_seed"] == [75, 25] and out["kind:D"]["win_rate"]["mean"] == 50
    assert out["category:c"]["rougeL"]["per_seed"] == [100, 100]
    with pytest.raises(ValueError, match="3 predictions for 2 records"):
        prompt_scores(recs, {1: ["a", "b", "c"]})
