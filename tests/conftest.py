# How the tests are named (one rule):
# - A test file is named after the module it tests: tests/test_<module>.py for src/prefkd/.../<module>.py
#   (test_loaders.py -> prefkd/data/loaders.py, test_dpkd.py -> prefkd/methods/dpkd.py, test_methods.py -> the
#   prefkd.methods registry). Where two modules share a file name, the test file names the package too:
#   test_evaluate.py -> prefkd/evaluate.py, test_recipes_evaluate.py -> prefkd/recipes/evaluate.py,
#   test_losses_preference.py -> prefkd/losses/preference.py, test_data_prepare.py -> prefkd/data/prepare.py.
# - A test of a behaviour that crosses modules, or of files that are not Python modules, is named after that
#   behaviour: test_end_to_end, test_failures, test_kill, test_security, test_multiprocess, test_teacher_cache,
#   test_docs, test_accelerate_configs, test_paper_recipes.
# - Helpers shared by several files live in tests/support.py (imported as `support`, tests/ is on pythonpath);
#   fixtures shared by several files live here.
# - A test that reads the team's real Dolly files (../shared/data, beside the clone) carries the `real_data` marker
#   and says so in its name (`..._on_real_dolly`); every other test writes the small files it reads.

import pytest
import support
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


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A real-data test fails, never skips, where ../shared/data is missing: CI has it beside the clone, and a
    skipped test there would hide that the real files stopped being checked."""
    if item.get_closest_marker("real_data") and not support.REAL_DATA.is_dir():
        pytest.fail(f"{item.nodeid} reads the real Dolly files and {support.REAL_DATA} is missing: put the team's "
                    "shared folder beside the clone (docs/development.md), or deselect these tests with "
                    "-m 'not real_data'",
                    pytrace=False)
