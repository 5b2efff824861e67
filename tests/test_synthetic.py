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


def test_large_splits_extend_test_and_validation_without_changing_any_other_record():
    s = build_suite()
    assert (len(s.test), len(s.test_large), len(s.validation), len(s.validation_large)) == (173, 607, 78, 316)
    assert s.test_large[:173] == s.test and s.validation_large[:78] == s.validation
    # The large splits are drawn last: with none of their items, every other split is the same records.
    small = build_suite(SuiteConfig(**{f: 0 for f in vars(SuiteConfig()) if f.startswith("large_")}))
    assert (small.d0, small.d, small.validation, small.test, small.corpus) == (s.d0, s.d, s.validation, s.test,
                                                                               s.corpus)
    assert small.test_large == s.test and small.validation_large == s.validation
    train = {r.prompt for r in s.d0 + s.d} | {doc for doc in s.corpus}
    large_test, large_val = ({r.prompt for r in split} for split in (s.test_large, s.validation_large))
    assert len(large_test) == 607 and len(large_val) == 316  # no prompt twice
    assert not large_test & large_val and not (large_test | large_val) & {r.prompt for r in s.d0 + s.d}
    assert not any(doc.startswith(p) for doc in train for p in large_test | large_val)
    # More long-form items: profiles and summaries are 23% of test and 27% of test_large.
    def long_form(split):
        return sum(r.category in ("profile", "summarization") for r in split)
    assert (long_form(s.test), long_form(s.test_large)) == (39, 161)
    buckets = Counter(length_bucket(r.references[0]) for r in s.test_large)
    assert buckets["(30,70]"] + buckets["(70,inf]"] == 90
