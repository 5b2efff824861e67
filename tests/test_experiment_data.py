"""The data stage of `prefkd compare` / `prefkd demo`: its key, and the chat format's tokenizer."""

from dataclasses import asdict, replace

import pytest
from support import write_dolly_files

from prefkd import stages
from prefkd.errors import ConfigError
from prefkd.experiment_data import ExperimentDataConfig, prepare_data
from prefkd.models import CHATML, load_tokenizer
from prefkd.recipes.compare import eval_records_file

CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]


def test_alpaca_keeps_the_data_key_it_had_and_chat_changes_it(tmp_path, tiny_suite_config):
    """Alpaca is the default and keys the stage exactly as before the template option existed (so the stages of
    runs made then stay valid); the chat format is another data stage."""
    cfg = ExperimentDataConfig(suite=tiny_suite_config, vocab_size=400)
    assert cfg.template == "alpaca"
    # How the key was computed before the template option and the large splits (whose sizes it leaves out).
    old = stages.fingerprint({k: v for k, v in asdict(cfg.suite).items() if not k.startswith("large_")},
                             cfg.vocab_size)
    assert prepare_data(cfg, tmp_path / "alpaca") == old
    assert prepare_data(replace(cfg, template="alpaca"), tmp_path / "alpaca") == old
    chat = prepare_data(replace(cfg, template="chat"), tmp_path / "chat")
    assert chat != old
    # The other branches of the key too: a suite with its own LM corpus, and Dolly.
    suite_none = replace(cfg, lm_corpus="none")
    assert prepare_data(suite_none, tmp_path / "none") == stages.fingerprint(old, [], "none")
    assert prepare_data(replace(suite_none, template="chat"), tmp_path / "none-chat") not in (old, chat)
    files = write_dolly_files(tmp_path / "dolly-files")
    dolly = replace(cfg, source="dolly", dolly=replace(cfg.dolly, **files))
    dolly_key = prepare_data(dolly, tmp_path / "dolly")
    assert dolly_key == stages.fingerprint("dolly", asdict(dolly.dolly), 400, [], "auto")
    assert prepare_data(replace(dolly, template="chat"), tmp_path / "dolly-chat") != dolly_key

    # One data directory, the template switched: the stage is rebuilt, not reused with the other tokenizer.
    shared = tmp_path / "shared"
    prepare_data(cfg, shared)
    assert not load_tokenizer(str(shared / "tokenizer")).chat_template
    prepare_data(replace(cfg, template="chat"), shared)
    assert load_tokenizer(str(shared / "tokenizer")).chat_template == CHATML


def test_chat_tokenizer_is_the_alpaca_bpe_plus_chatml_and_the_data_is_the_same(tmp_path, tiny_suite_config):
    cfg = ExperimentDataConfig(suite=tiny_suite_config, vocab_size=400)
    prepare_data(cfg, tmp_path / "alpaca")
    prepare_data(replace(cfg, template="chat"), tmp_path / "chat")
    alpaca, chat = (load_tokenizer(str(tmp_path / n / "tokenizer")) for n in ("alpaca", "chat"))
    # The BPE is learnt from the same plain text: same tokens, same ids; ChatML's two tokens come on top, special
    # (never split, skipped when decoding), and models built from this tokenizer have room for them.
    chat_vocab = chat.get_vocab()
    added = {t: chat_vocab.pop(t) for t in CHAT_TOKENS}
    assert chat_vocab == alpaca.get_vocab()
    assert sorted(added.values()) == [len(alpaca), len(alpaca) + 1] and len(chat) == len(alpaca) + 2
    assert set(CHAT_TOKENS) <= set(chat.all_special_tokens)
    text = "Name the town where Baxdor Talton lives."
    assert chat(text)["input_ids"] == alpaca(text)["input_ids"]
    assert chat.chat_template == CHATML and not alpaca.chat_template
    assert chat.eos_token == alpaca.eos_token and chat.pad_token_id == alpaca.pad_token_id
    # Shards, the LM corpus and the pretraining corpus do not depend on the template.
    for name in ("d0.jsonl", "d.jsonl", "d_prompts.jsonl", "validation.jsonl", "test.jsonl", "corpus.txt",
                 "pretrain.txt"):
        assert (tmp_path / "chat" / name).read_bytes() == (tmp_path / "alpaca" / name).read_bytes(), name


def test_an_unknown_template_is_refused_before_anything_is_written(tmp_path, tiny_suite_config):
    cfg = ExperimentDataConfig(suite=tiny_suite_config, vocab_size=400, template="chatml")
    with pytest.raises(ConfigError, match="data.template 'chatml' is not one of: alpaca, chat"):
        prepare_data(cfg, tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_the_teachers_own_tokenizer_is_its_own_stage_on_other_texts(tmp_path, tiny_suite_config):
    """`teacher_tokenizer.vocab_size` 0 (the default) writes nothing and leaves the data key alone; > 0 trains the
    teacher's BPE on D and the corpora (not D0) beside the shared one, in the same template, keyed on its own."""
    from prefkd.experiment_data import TeacherTokenizerConfig, prepare_teacher_tokenizer

    cfg = ExperimentDataConfig(suite=tiny_suite_config, vocab_size=400)
    old = stages.fingerprint({k: v for k, v in asdict(cfg.suite).items() if not k.startswith("large_")},
                             cfg.vocab_size)
    data = tmp_path / "data"
    assert prepare_data(cfg, data) == old
    assert prepare_teacher_tokenizer(cfg, data, old) is None and not (data / "tokenizer_teacher").exists()
    own = replace(cfg, teacher_tokenizer=TeacherTokenizerConfig(vocab_size=450))
    assert prepare_data(own, data) == old  # the student's stages keep their keys
    key = prepare_teacher_tokenizer(own, data, old)
    assert key and key != old
    teacher, student = (load_tokenizer(str(data / n)) for n in ("tokenizer_teacher", "tokenizer"))
    assert len(teacher) == 450 and not teacher.chat_template
    info = stages.json.loads((data / "tokenizer_teacher" / "stage.json").read_text())
    assert info["teacher_tokens"] == 450 and info["same_id"] < info["shared_strings"] < 450
    # Trained without D0: relative to the student's tokenizer (which saw both), D0's texts take more teacher tokens
    # than D's.
    from prefkd.data.loaders import load_instructions

    def ratio(shard):
        texts = [r.prompt + r.references[0] for r in load_instructions(str(data / f"{shard}.jsonl"))]
        return sum(len(teacher(t)["input_ids"]) for t in texts) / sum(len(student(t)["input_ids"]) for t in texts)

    assert ratio("d0") > ratio("d")
    stamp = (data / "tokenizer_teacher" / "tokenizer.json").stat().st_mtime_ns
    assert prepare_teacher_tokenizer(own, data, old) == key  # reused
    assert (data / "tokenizer_teacher" / "tokenizer.json").stat().st_mtime_ns == stamp
    chat = replace(own, template="chat")
    chat_key = prepare_data(chat, tmp_path / "chat")
    assert prepare_teacher_tokenizer(chat, tmp_path / "chat", chat_key) not in (key, None)
    chat_teacher = load_tokenizer(str(tmp_path / "chat" / "tokenizer_teacher"))
    assert chat_teacher.chat_template == CHATML and len(chat_teacher) == 452
    with pytest.raises(ConfigError, match="teacher_tokenizer.vocab_size must be 0"):
        prepare_teacher_tokenizer(replace(cfg, teacher_tokenizer=TeacherTokenizerConfig(vocab_size=-1)), data, old)


def test_large_splits_are_their_own_stage_and_leave_the_data_key_alone(tmp_path, tiny_suite_config):
    """Changing the large splits' sizes rewrites data/large and nothing else: the data key (and so every model
    stage) is unchanged; compare's eval_split=test_large reads the file and keys evaluations on its content."""
    from prefkd.data.loaders import load_instructions

    cfg = ExperimentDataConfig(suite=tiny_suite_config, vocab_size=400)
    key = prepare_data(cfg, tmp_path)
    test = load_instructions(str(tmp_path / "test.jsonl"))
    large = load_instructions(str(tmp_path / "large" / "test.jsonl"))
    assert large[: len(test)] == test and len(large) > len(test)
    path, name, split_key = eval_records_file("test_large", tmp_path)
    assert (path, name) == (tmp_path / "large" / "test.jsonl", "test_large")
    tokenizer_stamp = (tmp_path / "tokenizer" / "tokenizer.json").stat().st_mtime_ns
    bigger = replace(cfg, suite=replace(cfg.suite, large_test_skill_per_family=cfg.suite.large_test_skill_per_family
                                        + 2))
    assert prepare_data(bigger, tmp_path) == key
    assert (tmp_path / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == tokenizer_stamp  # not rebuilt
    assert len(load_instructions(str(tmp_path / "large" / "test.jsonl"))) == len(large) + 2 * 7
    assert eval_records_file("test_large", tmp_path)[2] != split_key  # a new file is evaluated again
    validation = load_instructions(str(tmp_path / "validation.jsonl"))
    assert load_instructions(str(tmp_path / "large" / "validation.jsonl"))[: len(validation)] == validation

    files = write_dolly_files(tmp_path / "dolly-files")
    dolly = replace(cfg, source="dolly", dolly=replace(cfg.dolly, **files))
    prepare_data(dolly, tmp_path / "dolly")
    with pytest.raises(ConfigError, match="data.source=suite only"):
        eval_records_file("validation_large", tmp_path / "dolly")
