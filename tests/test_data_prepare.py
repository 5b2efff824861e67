"""prefkd.data.prepare: splits, filters, shards and corpora on small files written here; the papers' split
sizes on the real Dolly files in one test."""

import json

import pytest
from support import DOLLY_ROWS, REAL_DOLLY, write_dolly_files

from prefkd.data.loaders import load_instructions
from prefkd.data.prepare import dolly_splits, filter_for_training, load_corpus, plad_shards, write_splits
from prefkd.data.records import Instruction


def _norm(text: str) -> str:
    return " ".join(text.split())


def _splits(files, seed=0):
    return dolly_splits(files["dolly"], files["test"], files["validation"], seed=seed)


def test_dolly_splits_hold_out_every_minillm_record(tmp_path):
    files = write_dolly_files(tmp_path)
    s, report = _splits(files)
    assert [r.instruction for r in s["test"]] == [r["instruction"] for r in DOLLY_ROWS[:3]]
    assert [r.instruction for r in s["validation"]] == [r["instruction"] for r in DOLLY_ROWS[3:5]]
    # Rows 0-4 are held out, and so is row 0's copy that differs only in whitespace: 13 = 7 + 6.
    assert sorted(r.instruction for r in s["train"]) == sorted(r["instruction"] for r in DOLLY_ROWS[5:])
    assert report == {"source": 13, "removed": 6, "train": 7, "validation": 2, "test": 3}


def test_dolly_splits_shuffle_is_seeded(tmp_path):
    files = write_dolly_files(tmp_path)
    s, _ = _splits(files)
    again, _ = _splits(files)
    other, _ = _splits(files, seed=1)
    assert [r.id for r in again["train"]] == [r.id for r in s["train"]]
    assert [r.id for r in other["train"]] != [r.id for r in s["train"]]
    assert sorted(r.id for r in other["train"]) == sorted(r.id for r in s["train"])
    file_order = [f"dolly.jsonl:{i}" for i in range(6, 13)]
    assert sorted(r.id for r in s["train"]) == sorted(file_order) and [r.id for r in s["train"]] != file_order


@pytest.mark.real_data
def test_dolly_splits_on_real_dolly():
    """The papers' split sizes: they hold only for the real 15k file and MiniLLM's released test and dev files."""
    s, report = dolly_splits(REAL_DOLLY / "databricks-dolly-15k.jsonl", REAL_DOLLY / "test-minillm-500.jsonl",
                             REAL_DOLLY / "dev-minillm-1000.jsonl", seed=0)
    held_out = {(_norm(r.instruction), _norm(r.references[0])) for r in s["test"] + s["validation"]}
    assert len(held_out) == 1500  # the two MiniLLM files share no record
    assert not any((_norm(r.instruction), _norm(r.references[0])) in held_out for r in s["train"])
    # Every held-out record occurs in the 15k file (some more than once), so 1,503 are removed.
    assert report == {"source": 15015, "removed": 1503, "train": 13512, "validation": 1000, "test": 500}


def _words(n: int) -> str:
    return " ".join(["word"] * n)


def test_filter_for_training_counts_first_failed_filter(tokenizer):
    def n_tokens(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    ok = Instruction("Name a colour.", references=(_words(11),), id="ok")
    short = Instruction("Name a colour.", references=(_words(10),), id="short")
    none = Instruction("Name a colour.", id="none")
    long_prompt = Instruction("Name a colour.", input=_words(60), references=(_words(12),), id="long_prompt")
    # A long prompt with a short response counts as short_response: the first filter it fails.
    long_and_short = Instruction("Name a colour.", input=_words(60), references=("Blue.",), id="both")
    too_long = Instruction("Name a colour.", references=(_words(80),), id="too_long")
    max_prompt = n_tokens(ok.prompt) + 5
    max_length = n_tokens(ok.prompt) + n_tokens(ok.references[0]) + 1 + 10
    assert n_tokens(long_prompt.prompt) > max_prompt
    assert n_tokens(too_long.prompt) <= max_prompt < max_length < n_tokens(too_long.prompt) + 80
    records = [ok, short, none, long_prompt, long_and_short, too_long]
    kept, counts = filter_for_training(records, tokenizer, max_prompt_tokens=max_prompt, max_length=max_length)
    assert [r.id for r in kept] == ["ok"]
    assert counts == {"short_response": 3, "long_prompt": 1, "too_long": 1, "kept": 1}
    # At exactly the limit a record is kept (prompt + response + EOS == max_length).
    exact = n_tokens(ok.prompt) + n_tokens(ok.references[0]) + 1
    kept, counts = filter_for_training([ok], tokenizer, max_prompt_tokens=n_tokens(ok.prompt), max_length=exact)
    assert len(kept) == 1 and counts["kept"] == 1
    kept, counts = filter_for_training([ok], tokenizer, max_length=exact - 1)
    assert kept == [] and counts["too_long"] == 1


def test_filter_for_training_counts_tokens_as_the_chat_template_renders_them():
    """With a chat tokenizer a record is as long as training renders it: the template's prompt (BOS included) and
    the reply with its end-of-turn token, not the Alpaca prompt."""
    from support import CHAT_CONVERSATIONS, chat_record, chat_texts, chat_tokenizer

    tok = chat_tokenizer("llama", chat_texts(CHAT_CONVERSATIONS))
    rec = chat_record({**CHAT_CONVERSATIONS[1], "messages": [*CHAT_CONVERSATIONS[1]["messages"][:-1],
                                                            {"role": "assistant", "content": _words(11)}]})
    prompt = len(tok.apply_chat_template(rec.messages(), add_generation_prompt=True, tokenize=True,
                                         return_dict=False))
    exact = prompt + len(tok(_words(11), add_special_tokens=False)["input_ids"]) + 1  # + <|eot_id|>
    assert prompt != len(tok(rec.prompt, add_special_tokens=False)["input_ids"]) + 1  # not the Alpaca count
    assert filter_for_training([rec], tok, max_prompt_tokens=prompt, max_length=exact)[1]["kept"] == 1
    assert filter_for_training([rec], tok, max_prompt_tokens=prompt - 1)[1]["long_prompt"] == 1
    assert filter_for_training([rec], tok, max_length=exact - 1)[1]["too_long"] == 1


def test_plad_shards_disjoint_and_deterministic():
    train = [Instruction(f"q{i}", references=(f"a{i}",), id=str(i)) for i in range(101)]
    d0, d = plad_shards(train, seed=3)
    assert (len(d0), len(d)) == (50, 51)
    assert {r.id for r in d0}.isdisjoint({r.id for r in d}) and {r.id for r in d0 + d} == {r.id for r in train}
    assert plad_shards(train, seed=3) == (d0, d)
    assert plad_shards(train, seed=4)[0] != d0
    d0, d = plad_shards(train, seed=0, fraction=0.3)
    assert (len(d0), len(d)) == (30, 71)
    with pytest.raises(ValueError):
        plad_shards(train, fraction=1.0)


def test_write_splits_writes_once(tmp_path):
    splits = {"train": [Instruction("a", references=("b",), id="1")],
              "test": [Instruction("c", "ctx", ("d",), "open_qa", None, "2")]}
    out = tmp_path / "splits"
    assert write_splits(splits, out, seed=0, extra={"removed": 3}) is True
    summary = json.loads((out / "splits.json").read_text())
    assert summary["counts"] == {"train": 1, "test": 1} and summary["seed"] == 0 and summary["removed"] == 3
    assert load_instructions(out / "test.jsonl") == splits["test"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert write_splits(splits, out, seed=0, extra={"removed": 3}) is False
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    # A different seed, or different content with the same counts, is rewritten.
    assert write_splits(splits, out, seed=1) is True
    changed = {**splits, "train": [Instruction("x", references=("y",), id="1")]}
    assert write_splits(changed, out, seed=1) is True
    assert load_instructions(out / "train.jsonl") == changed["train"]


def test_load_corpus_wikitext_articles(tmp_path):
    # WikiText's layout: " = Title = " starts an article, " = = Section = = " does not; blank lines in between.
    f = tmp_path / "wiki.txt"
    f.write_text(" \n = Homarus gammarus = \n \n Homarus gammarus is a lobster . \n \n = = Description = = \n"
                 " \n It is blue . \n \n = Ancient Egypt = \n \n A civilisation . \n")
    docs = load_corpus(str(f))
    assert len(docs) == 2
    assert docs[0].startswith("= Homarus gammarus =") and "= = Description = =" in docs[0] and "blue" in docs[0]
    assert docs[1].startswith("= Ancient Egypt =") and "civilisation" in docs[1]
    assert all(d.strip() == d for d in docs)


def test_load_corpus_blank_line_paragraphs(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("\n\nFirst para\nline two\n\n\nSecond\n  \n\t\nThird\n\n")
    assert load_corpus(str(f)) == ["First para\nline two", "Second", "Third"]
    # Tiny Shakespeare's layout: one speech per blank-line paragraph, Windows line ends read the same.
    f.write_text("First Citizen:\r\nBefore we proceed.\r\n\r\nAll:\r\nSpeak, speak.\r\n")
    assert load_corpus(str(f)) == ["First Citizen:\nBefore we proceed.", "All:\nSpeak, speak."]
