import pytest
import torch

from prefkd.data.synthetic import SuiteConfig, build_suite
from prefkd.models import train_tokenizer

TINY_SUITE = SuiteConfig(n_people=16, skill_per_family=4, test_world_questions=4, test_profiles=2, test_skill=7,
                         val_world_questions=2, val_profiles=1, val_skill=7, corpus_skill_per_family=4)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_suite_config():
    return TINY_SUITE


@pytest.fixture(scope="session")
def tiny_suite():
    return build_suite(TINY_SUITE)


@pytest.fixture(scope="session")
def tokenizer(tiny_suite):
    texts = [r.prompt + r.references[0] for r in tiny_suite.d0 + tiny_suite.d] + tiny_suite.corpus
    return train_tokenizer(texts, vocab_size=400)
