"""Small record files for CLI tests."""

from prefkd.data.records import write_records
from prefkd.data.synthetic import SuiteConfig, build_suite


def tiny_files(tmp_path, tokenizer) -> dict:
    suite = build_suite(SuiteConfig(n_people=8, skill_per_family=2, test_world_questions=2, test_profiles=1,
                                    test_skill=7, val_world_questions=1, val_profiles=1, val_skill=7,
                                    corpus_skill_per_family=2))
    files = {"train": tmp_path / "train.jsonl", "test": tmp_path / "test.jsonl", "corpus": tmp_path / "corpus.txt",
             "tokenizer": tmp_path / "tok"}
    write_records(files["train"], suite.d0)
    write_records(files["test"], suite.test[:6])
    files["corpus"].write_text("\n\n".join(suite.corpus))
    tokenizer.save_pretrained(files["tokenizer"])
    return files
