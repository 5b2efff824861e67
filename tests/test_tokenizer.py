from transformers import AutoTokenizer

from prefkd.data.synthetic import SuiteConfig, build_suite
from prefkd.models import train_tokenizer


def test_round_trip_and_reload(tokenizer, tiny_suite, tmp_path):
    text = tiny_suite.test[0].prompt + tiny_suite.test[0].references[0] + " café naïve 日本"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.eos_token_id == again.pad_token_id == tokenizer.eos_token_id


def test_suite_reaches_target_vocabulary():
    suite = build_suite(SuiteConfig())
    texts = [r.prompt + r.references[0] for r in suite.d0 + suite.d] + suite.corpus
    assert len(train_tokenizer(texts, vocab_size=2048)) == 2048
