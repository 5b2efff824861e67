import copy
import math

import numpy as np
import pytest
import torch
from support import save_bert_reward_model, save_gpt2_reward_model, save_lm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from prefkd.data.records import Instruction
from prefkd.errors import PrefkdError
from prefkd.judges import (
    Judge,
    JudgeConfig,
    LogLikelihoodJudge,
    RewardModelJudge,
    RougeJudge,
    head_to_head,
    judge_against_references,
    judge_kind,
    make_judge,
    preferences,
    question_text,
    reference_scores,
    win_rate,
)
from prefkd.models import add_chat_format


class WordCountJudge(Judge):
    """A judge whose scores are easy to check by hand: more words is better."""

    name = "words"

    def score(self, records, responses):
        return [float(len(r.split())) for r in responses]


RECORDS = [Instruction("Name a colour.", references=("teal",), id="1"),
           Instruction("Describe the sea.", input="Be brief.", references=("it is big and blue", "wet"), id="2"),
           Instruction("Count to three.", references=("one two three",), id="3")]


def test_preferences_and_win_rate_hand_checked():
    a, b = [1.0, 2.0, 3.0, 3.0], [0.0, 2.0, 4.0, 3.05]
    assert preferences(a, b).tolist() == [100, 50, 0, 0]
    assert win_rate(a, b) == 37.5  # (1 + 0.5 + 0 + 0) / 4
    assert win_rate(a, b, tie_tolerance=0.1) == 50  # 3.0 vs 3.05 is now a tie: (1 + 0.5 + 0 + 0.5) / 4
    # identical texts tie whatever the (batch-dependent) scores say
    assert preferences([1.0, 2.0], [1.0000001, 1.0], ["x", "y "], [" x", "z"]).tolist() == [50, 100]
    with pytest.raises(ValueError):
        preferences([1.0], [1.0, 2.0])


def test_win_rate_against_references_hand_checked():
    preds = {10: ["teal blue", "big", "one two three"], 20: ["x", "a b c d e f", "one two"]}
    out = judge_against_references(WordCountJudge(), RECORDS, preds)
    # best reference per prompt: 1, 5 ("it is big and blue" beats "wet"), 3 words
    assert out["judge_reference"].tolist() == [1, 5, 3]
    # seed 10: 2>1 win, 1<5 loss, identical text tie -> (1 + 0 + 0.5) / 3; seed 20: 1=1 tie, 6>5 win, 2<3 loss
    assert out["win_rate"].tolist() == [[100, 0, 50], [50, 100, 0]]
    assert out["win_rate"].mean(axis=1).tolist() == [50, 50]
    assert out["judge_score"].tolist() == [[2, 1, 3], [1, 6, 2]]


def test_head_to_head_pairs_seeds_and_broadcasts_one_side():
    a = {1: ["a b", "a", "a b c"], 2: ["a", "a", "a"]}
    b = {0: ["a", "a b", "a b c"]}
    out = head_to_head(WordCountJudge(), RECORDS, a, b)
    assert out["win_rate"].tolist() == [[100, 0, 50], [50, 0, 0]]
    with pytest.raises(PrefkdError, match="same number"):
        head_to_head(WordCountJudge(), RECORDS, a, {5: b[0], 6: b[0], 7: b[0]})


def test_rouge_judge_needs_references_and_cannot_judge_them():
    j = RougeJudge()
    assert j.score(RECORDS[:1], ["teal"]) == [100]
    with pytest.raises(PrefkdError, match="needs references"):
        j.score([Instruction("q")], ["x"])
    with pytest.raises(PrefkdError, match="cannot judge a response against the references"):
        reference_scores(j, RECORDS)
    assert judge_kind("rouge") == "rouge" and isinstance(make_judge(JudgeConfig(path="rouge")), RougeJudge)
    assert make_judge(JudgeConfig()) is None


def test_question_text():
    assert question_text(RECORDS[0]) == "Name a colour."
    assert question_text(RECORDS[1]) == "Describe the sea.\n\nBe brief."
    chat = Instruction("And the sky?", context=(("user", "Colour of grass?"), ("assistant", "Green."),
                                                 ("user", "And the sky?")))
    assert question_text(chat) == "user: Colour of grass?\n\nassistant: Green.\n\nuser: And the sky?"


def test_a_chat_reward_model_reads_the_conversation_in_its_template(tmp_path, tokenizer):
    tokenizer = add_chat_format(copy.deepcopy(tokenizer))
    path = save_gpt2_reward_model(tmp_path / "rm", tokenizer)
    judge = make_judge(JudgeConfig(path=path, batch_size=2))
    chat = Instruction("And the sky?", context=(("system", "Be brief."), ("user", "Grass?"), ("assistant", "Green."),
                                                 ("user", "And the sky?")))
    model, tok = AutoModelForSequenceClassification.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nGrass?<|im_end|>\n<|im_start|>assistant\n"
            "Green.<|im_end|>\n<|im_start|>user\nAnd the sky?<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n")
    with torch.no_grad():
        want = model(**tok(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0].item()
    assert judge.score_one(chat, "Blue.") == pytest.approx(want, abs=1e-5)


def test_gpt2_reward_model_judge_matches_one_by_one_forward(tmp_path, tokenizer):
    path = save_gpt2_reward_model(tmp_path / "rm", tokenizer)
    judge = make_judge(JudgeConfig(path=path, batch_size=2))  # kind auto: a *ForSequenceClassification
    assert isinstance(judge, RewardModelJudge) and judge.name == f"reward-model:{path}"
    responses = ["teal", "it is a very big sea indeed", ""]
    got = judge.score(RECORDS, responses)
    # independent: stock transformers, one unpadded pair at a time
    model, tok = AutoModelForSequenceClassification.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        want = [model(**tok(question_text(r), resp, return_tensors="pt")).logits[0, 0].item()
                for r, resp in zip(RECORDS, responses, strict=True)]
    assert got == pytest.approx(want, abs=1e-5)
    assert judge.score_one(RECORDS[1], responses[1]) == pytest.approx(want[1], abs=1e-5)


def test_encoder_reward_model_judge_uses_text_pairs(tmp_path):
    texts = [question_text(r) for r in RECORDS] + [x for r in RECORDS for x in r.references]
    path = save_bert_reward_model(tmp_path / "bert-rm", texts)
    judge = make_judge(JudgeConfig(path=path, batch_size=3, max_length=2048))
    assert judge.max_length == 64  # capped by the tokenizer and the model's positions
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(question_text(RECORDS[0]), "teal")["input_ids"]
    assert tok.convert_ids_to_tokens(ids).count("[SEP]") == 2  # [CLS] question [SEP] response [SEP]
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    responses = ["teal", "blue sea", "one two three"]
    with torch.no_grad():
        want = [model(**tok(question_text(r), resp, return_tensors="pt")).logits[0, 0].item()
                for r, resp in zip(RECORDS, responses, strict=True)]
    assert judge.score(RECORDS, responses) == pytest.approx(want, abs=1e-5)
    # over the 64 positions: cut to fit (longest side first), not an error
    long = " ".join(["blue"] * 100)
    with torch.no_grad():
        want_long = model(**tok(question_text(RECORDS[1]), long, truncation=True, max_length=64,
                                return_tensors="pt")).logits[0, 0].item()
    assert judge.score_one(RECORDS[1], long) == pytest.approx(want_long, abs=1e-5)


def test_reward_model_judge_refuses_several_outputs(tmp_path, tokenizer):
    path = save_gpt2_reward_model(tmp_path / "rm", tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, ignore_mismatched_sizes=True)
    model.save_pretrained(tmp_path / "rm3")
    tokenizer.save_pretrained(tmp_path / "rm3")
    with pytest.raises(PrefkdError, match="3 outputs"):
        RewardModelJudge(str(tmp_path / "rm3"))


def test_loglik_judge_of_a_uniform_model_is_minus_log_vocab(tmp_path, tokenizer):
    path = save_lm(tmp_path / "lm", tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # zero embeddings and head: every logit is 0, the next-token distribution is uniform
    model.save_pretrained(path)
    judge = make_judge(JudgeConfig(path=path))
    assert isinstance(judge, LogLikelihoodJudge)
    scores = judge.score(RECORDS, ["teal", "a much longer response with many words", ""])
    assert scores == pytest.approx([-math.log(len(tokenizer))] * 3, abs=1e-5)


def test_loglik_judge_matches_full_softmax(tmp_path, tokenizer):
    path = save_lm(tmp_path / "lm", tokenizer, size="micro", seed=3)
    judge = LogLikelihoodJudge(path, batch_size=2)
    responses = ["teal", "it is big", "one two three four"]
    got = judge.score(RECORDS, responses)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    want = []
    with torch.no_grad():
        for r, resp in zip(RECORDS, responses, strict=True):
            p = tokenizer(r.prompt, add_special_tokens=False)["input_ids"]
            y = tokenizer(resp, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            logp = torch.log_softmax(model(torch.tensor([p + y])).logits[0].double(), -1)
            want.append(float(np.mean([logp[len(p) - 1 + t, tok].item() for t, tok in enumerate(y)])))
    assert got == pytest.approx(want, abs=1e-4)


def test_judge_kind_errors(tmp_path):
    with pytest.raises(Exception, match="unknown judge.kind"):
        judge_kind("x", "gpt4")
    with pytest.raises(PrefkdError, match="cannot read the judge's config"):
        judge_kind(str(tmp_path / "missing-model"))
