from collections import Counter

from prefkd.data.synthetic import SuiteConfig, build_suite
from prefkd.evaluate import length_bucket


def test_deterministic(tiny_suite, tiny_suite_config):
    again = build_suite(tiny_suite_config)
    assert again.d0 == tiny_suite.d0 and again.test == tiny_suite.test and again.corpus == tiny_suite.corpus
    other = build_suite(SuiteConfig(**{**tiny_suite_config.__dict__, "seed": 1}))
    assert other.test != tiny_suite.test


def test_splits_are_disjoint_and_d_facts_stay_out_of_d0():
    s = build_suite()
    train_prompts = {r.prompt for r in s.d0 + s.d}
    assert not train_prompts & {r.prompt for r in s.test}
    assert not train_prompts & {r.prompt for r in s.validation}
    assert not {r.prompt for r in s.test} & {r.prompt for r in s.validation}
    d_people = {r.id.split("/")[0] for r in s.d if r.kind == "D"}
    d0_people = {r.id.split("/")[0] for r in s.d0 if r.kind == "D0"}
    assert d_people and d0_people and not d_people & d0_people
    assert {r.kind for r in s.d0} == {"D0", "skill"} and {r.kind for r in s.d} == {"D", "skill"}
    # The LM-loss corpus is built from D0 and fresh skill items: it never leaks D references to the student.
    d_profiles = {r.references[0] for r in s.d if r.category == "profile"}
    assert not any(ref in doc for doc in s.corpus for ref in d_profiles)


def test_test_split_covers_kinds_families_and_length_buckets():
    s = build_suite()
    kinds = Counter(r.kind for r in s.test)
    assert kinds["D"] > 0 and kinds["D0"] > 0 and kinds["skill"] > 0
    assert len({r.category for r in s.d0}) >= 8
    buckets = Counter(length_bucket(r.references[0]) for r in s.test)
    assert set(buckets) == {"(0,30]", "(30,70]", "(70,inf]"}, buckets
