"""The data stage of an experiment: shards on disk plus a tokenizer trained on what the models may read.

Every source writes the same files under `OUT/data` (the PLaD protocol):
  d0.jsonl          labelled shard: the student's SFT data, replayed during distillation
  d.jsonl           distillation shard with references: the teacher trains on it, nothing else does
  d_prompts.jsonl   D's prompts only: what distillation methods may see of D
  validation.jsonl  for tuning and the diagnostics batch;  test.jsonl  for the final numbers
  large/            suite only: test.jsonl (607 prompts: the 173 of test.jsonl first, then further unseen items)
                    and validation.jsonl (316: validation.jsonl's 78 first), for paired differences of about a
                    point (`prefkd compare eval_split=test_large|validation_large`). Their own stage: the data key
                    ignores their sizes, so adding them left every earlier stage valid
  corpus.txt        LM-loss corpus (documents separated by blank lines)
  pretrain.txt      pretraining corpus for models built from scratch (may be empty)
  tokenizer/        byte-level BPE trained on D0 + D + the corpora; with `data.template=chat`, the same BPE plus
                    ChatML's special tokens and chat template (`models.add_chat_format`), so that every later stage
                    (SFT, distillation, sample caches, evaluation) renders records in ChatML through
                    `data.template=auto`
  tokenizer_teacher/  only with `data.teacher_tokenizer.vocab_size` > 0: the teacher's own byte-level BPE, trained
                    on D + the corpora (not D0) with its own vocabulary size, in the same template; the teacher is
                    trained with it and keeps it in its saved model, so distillation runs cross tokenizers. Its own
                    stage (`prepare_teacher_tokenizer`): the data key, and so the student's stages, stay as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from prefkd import atomic, stages
from prefkd.config import opt, section
from prefkd.console import console
from prefkd.data.loaders import load_instructions
from prefkd.data.prepare import dolly_splits, load_corpus, plad_shards
from prefkd.data.records import Instruction, write_records
from prefkd.data.synthetic import LARGE_FIELDS, SuiteConfig, build_suite
from prefkd.errors import ConfigError
from prefkd.models import add_chat_format, load_tokenizer, train_tokenizer

TEMPLATES = ("alpaca", "chat")


@dataclass
class DollyConfig:
    dolly: str = opt("databricks/databricks-dolly-15k", "Dolly 15k: the hub id or a local copy in its own format")
    test: str = opt("", "MiniLLM's 500-record Dolly test set (a local file from MiniLLM's data release)")
    validation: str = opt("", "MiniLLM's 1000-record Dolly validation set (a local file from MiniLLM's data release)")
    min_response_words: int = opt(11, "drop training records whose response is shorter (papers' filter)")
    d0_fraction: float = opt(0.5, "share of the training split in the labelled shard D0 (PLaD: 0.5)")
    max_train: int = opt(0, "keep at most this many training records before sharding (0 = all)")
    max_validation: int = opt(0, "keep at most this many validation records (0 = all)")
    max_test: int = opt(0, "keep at most this many test records (0 = all; the papers use all 500)")
    seed: int = opt(0, "shuffle and shard seed")


@dataclass
class TeacherTokenizerConfig:
    vocab_size: int = opt(0, "0 = the teacher reads the experiment's tokenizer; > 0 = the teacher gets its own "
                             "byte-level BPE of this size, trained on D and the corpora only (not D0: other texts "
                             "than the student's tokenizer, so other merges and other ids), saved as "
                             "OUT/data/tokenizer_teacher (distillation then runs across tokenizers)")


@dataclass
class ExperimentDataConfig:
    source: str = opt("suite", "'suite' (the embedded instruction suite) or 'dolly' (MiniLLM/DPKD splits)")
    vocab_size: int = opt(2048, "byte-level BPE vocabulary trained on the experiment's text")
    suite: SuiteConfig = section(SuiteConfig)
    dolly: DollyConfig = section(DollyConfig)
    pretrain_corpus: list[str] = opt([], "text files for pretraining models built from scratch (e.g. WikiText-2)")
    lm_corpus: str = opt("auto", "LM-loss corpus: 'auto' (the suite's own corpus, or pretrain_corpus for Dolly), "
                                 "'none', or a text file")
    template: str = opt("alpaca", "format the models are trained and evaluated in: 'alpaca' (the Alpaca prompt, "
                                  "EOS ends a response) or 'chat' (ChatML: the tokenizer gains <|im_start|>, "
                                  "<|im_end|> and a chat template; the BPE is trained on the same plain text)")
    teacher_tokenizer: TeacherTokenizerConfig = section(TeacherTokenizerConfig)


def prepare_data(cfg: ExperimentDataConfig, data_dir: Path) -> str:
    """Write the data stage once; return its key (a fingerprint of everything it depends on)."""
    if cfg.source == "suite":
        key = stages.fingerprint(_training_suite(cfg.suite), cfg.vocab_size)  # = the demo's key before compare existed
        if cfg.pretrain_corpus or cfg.lm_corpus != "auto":
            key = stages.fingerprint(key, cfg.pretrain_corpus, cfg.lm_corpus)
    elif cfg.source == "dolly":
        key = stages.fingerprint("dolly", asdict(cfg.dolly), cfg.vocab_size, cfg.pretrain_corpus, cfg.lm_corpus)
    else:
        raise ConfigError(f"data.source '{cfg.source}' is not one of: suite, dolly")
    if cfg.template not in TEMPLATES:
        raise ConfigError(f"data.template '{cfg.template}' is not one of: {', '.join(TEMPLATES)} (an experiment "
                          "builds its tokenizer; `prefkd sft` and `prefkd distill` take a model's own template)")
    if cfg.template != "alpaca":  # Alpaca keeps the key it always had, so existing runs' stages stay valid
        key = stages.fingerprint(key, "template", cfg.template)
    if stages.is_done(data_dir, key):
        _large_splits(cfg, data_dir, key)
        return key
    shards, suite_corpus = _suite(cfg.suite) if cfg.source == "suite" else _dolly(cfg.dolly)
    pretrain = [d for path in cfg.pretrain_corpus for d in load_corpus(path)]
    if cfg.lm_corpus == "auto":
        lm = suite_corpus if cfg.source == "suite" else pretrain
    else:
        lm = [] if cfg.lm_corpus == "none" else load_corpus(cfg.lm_corpus)
    for name, records in shards.items():
        write_records(data_dir / f"{name}.jsonl", records)
    # What the student may see of D: its prompts. D's references train the teacher and nothing else.
    write_records(data_dir / "d_prompts.jsonl", [replace(r, references=()) for r in shards["d"]])
    atomic.write_text(data_dir / "corpus.txt", "\n\n".join(lm))
    atomic.write_text(data_dir / "pretrain.txt", "\n\n".join(pretrain))
    # The BPE is learnt from the same text whatever the template, so its merges do not depend on the markup.
    texts = [_text(r) for r in shards["d0"] + shards["d"]] + suite_corpus + pretrain
    _save_tokenizer(train_tokenizer(texts, cfg.vocab_size), cfg.template, data_dir / "tokenizer")
    sizes = {n: len(v) for n, v in shards.items()}
    console.print(f"data ({cfg.source}): {sizes}, LM corpus {len(lm)} documents, pretraining corpus "
                  f"{len(pretrain)} documents, tokenizer {cfg.vocab_size} tokens"
                  + (" + ChatML's 2 special tokens and chat template" if cfg.template == "chat" else ""))
    stages.mark_done(data_dir, key, {"sizes": sizes})
    _large_splits(cfg, data_dir, key)
    return key


def _training_suite(cfg: SuiteConfig) -> dict:
    """The suite's settings that change the data stage's files; the large splits have their own stage."""
    return {k: v for k, v in asdict(cfg).items() if k not in LARGE_FIELDS}


def _large_splits(cfg: ExperimentDataConfig, data_dir: Path, data_key: str) -> None:
    if cfg.source != "suite":
        return
    out = data_dir / "large"
    key = stages.fingerprint(data_key, asdict(cfg.suite))
    if stages.is_done(out, key):
        return
    suite = build_suite(cfg.suite)
    write_records(out / "test.jsonl", suite.test_large)
    write_records(out / "validation.jsonl", suite.validation_large)
    stages.mark_done(out, key, {"sizes": {"test": len(suite.test_large), "validation": len(suite.validation_large)}})


def large_split_file(data_dir: Path, split: str) -> Path:
    """`test_large` or `validation_large` of an experiment's data stage, refused with the reason where the data
    source has none."""
    path = data_dir / "large" / f"{split.removesuffix('_large')}.jsonl"
    if not path.is_file():
        raise ConfigError(f"eval_split={split}: the large splits exist for data.source=suite only ({path} is "
                          "missing); use test or validation, or a records file of your own")
    return path


def prepare_teacher_tokenizer(cfg: ExperimentDataConfig, data_dir: Path, data_key: str) -> str | None:
    """With `teacher_tokenizer.vocab_size` > 0, write OUT/data/tokenizer_teacher once (after `prepare_data`); return
    its key, or None when the teacher shares the experiment's tokenizer.

    The teacher's BPE is trained on D's prompts and references plus the LM and pretraining corpora: the teacher's
    own data without the student's D0, so its merges (and ids) differ from the shared tokenizer's as a tokenizer
    trained on another corpus would, while every text still has a byte-level encoding in both."""
    size = cfg.teacher_tokenizer.vocab_size
    if size == 0:
        return None
    if size < 0:
        raise ConfigError(f"data.teacher_tokenizer.vocab_size must be 0 (the shared tokenizer) or positive, not "
                          f"{size}")
    out = data_dir / "tokenizer_teacher"
    key = stages.fingerprint(data_key, "teacher_tokenizer", asdict(cfg.teacher_tokenizer))
    if stages.is_done(out, key):
        return key
    d = load_instructions(str(data_dir / "d.jsonl"))
    corpora = [(data_dir / f).read_text(encoding="utf-8") for f in ("corpus.txt", "pretrain.txt")]
    texts = [_text(r) for r in d] + [doc for c in corpora for doc in c.split("\n\n") if doc.strip()]
    _save_tokenizer(train_tokenizer(texts, size), cfg.template, out)
    teacher, student = (load_tokenizer(str(data_dir / n)) for n in ("tokenizer_teacher", "tokenizer"))
    t_vocab, s_vocab = teacher.get_vocab(), student.get_vocab()
    shared = set(t_vocab) & set(s_vocab)
    same_id = sum(t_vocab[t] == s_vocab[t] for t in shared)
    # How differently the two read the test set's responses: bytes per token, and the share of responses split
    # into the same strings (the ids differ all the same).
    test = [r.references[0] for r in load_instructions(str(data_dir / "test.jsonl"))]
    pieces = {n: [tok.convert_ids_to_tokens(tok(t)["input_ids"]) for t in test] for n, tok in (("teacher", teacher),
                                                                                              ("student", student))}
    n_bytes = sum(len(t.encode("utf-8")) for t in test)
    same_split = sum(a == b for a, b in zip(pieces["teacher"], pieces["student"], strict=True)) / len(test)
    info = {"teacher_tokens": len(teacher), "student_tokens": len(student), "shared_strings": len(shared),
            "same_id": same_id, "test_bytes_per_token": {n: round(n_bytes / sum(map(len, p)), 3)
                                                         for n, p in pieces.items()},
            "test_same_segmentation": round(same_split, 3)}
    if len(teacher) < size:  # the BPE stops when no pair of tokens is seen twice more
        console.print(f"[yellow]teacher tokenizer: the BPE stopped at {len(teacher)} of data.teacher_tokenizer."
                      f"vocab_size={size} tokens: D and the corpora hold no more pairs seen twice")
    console.print(f"teacher tokenizer: {len(teacher)} tokens trained on D and the corpora; {len(shared)} of them are "
                  f"also the student's ({same_id} with the same id); test responses: "
                  f"{info['test_bytes_per_token']['teacher']} bytes per teacher token, "
                  f"{info['test_bytes_per_token']['student']} per student token, {same_split:.0%} split into the "
                  "same strings")
    stages.mark_done(out, key, info)
    return key


def _text(r: Instruction) -> str:
    return r.prompt + r.references[0]


def _save_tokenizer(tokenizer, template: str, path: Path) -> None:
    if template == "chat":
        tokenizer = add_chat_format(tokenizer)
    with atomic.directory(path) as tmp:
        tokenizer.save_pretrained(tmp)


def _suite(cfg: SuiteConfig) -> tuple[dict[str, list[Instruction]], list[str]]:
    suite = build_suite(cfg)
    return {n: getattr(suite, n) for n in ("d0", "d", "validation", "test")}, suite.corpus


def _dolly(cfg: DollyConfig) -> tuple[dict[str, list[Instruction]], list[str]]:
    splits, report = dolly_splits(cfg.dolly, cfg.test, cfg.validation, cfg.seed)
    train = [r for r in splits["train"] if len(r.references[0].split()) >= cfg.min_response_words]
    short = len(splits["train"]) - len(train)
    train = train[: cfg.max_train or None]  # dolly_splits already shuffled with the seed
    d0, d = plad_shards(train, cfg.seed, cfg.d0_fraction)
    console.print(f"dolly: {report['removed']} of {report['source']} records removed from train (they are test or "
                  f"validation records); {short} training responses under {cfg.min_response_words} words dropped")
    return {"d0": d0, "d": d, "validation": splits["validation"][: cfg.max_validation or None],
            "test": splits["test"][: cfg.max_test or None]}, []

