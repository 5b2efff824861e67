"""dpkd with teacher_samples=cached: y_t and log p(y_t) are kept after epoch 1, exactly, and survive a kill."""

import json

import pytest
import torch

import prefkd.methods.dpkd as dpkd
from prefkd.cache import TeacherCache
from prefkd.data.collate import Example, collate
from prefkd.generation import SamplingConfig
from prefkd.logprobs import _padded_response_token_logps
from prefkd.methods import MethodConfig, StepInputs
from prefkd.methods.dpkd import DPKDConfig, dpkd_pair_loss, pair_step, teacher_logps
from prefkd.models import ModelConfig, build_model, load_model, save_pretrained
from prefkd.recipes.common import DataConfig
from prefkd.recipes.distill import DistillRun, run_distill
from prefkd.train import TrainConfig

N_PROMPTS, BATCH = 8, 4  # two steps per epoch


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("teacher_cache")
    for name, size, seed in (("teacher", "micro", 1), ("student", "nano", 2)):
        save_pretrained(build_model("gpt2", size, tokenizer, seed=seed), tokenizer, root / name)
    return root


def _cfg(root, out, steps=4, mode="cached"):
    return DistillRun(out=str(out), method="dpkd", student=ModelConfig(path=str(root / "student")),
                      teacher=ModelConfig(path=str(root / "teacher")), data=DataConfig(),
                      train=TrainConfig(steps=steps, batch_size=BATCH, lr=1e-3, log_every=1, save_every=1),
                      distill=MethodConfig(replay=0.0, lm_weight=0.0, dpkd=DPKDConfig(teacher_samples=mode)),
                      sampling=SamplingConfig(max_new_tokens=8))


@pytest.fixture
def counts(monkeypatch):
    """Teacher sampling calls and the y_t the teacher scores, per step."""
    state = {"teacher_samples": [], "teacher_scored_yt": []}
    real_sample, real_logps = dpkd.sample_teacher, dpkd.teacher_logps

    def sample_teacher(examples, inp):
        state["teacher_samples"].append(len(examples))
        return real_sample(examples, inp)

    def logps(teacher, prompts, y_t, y_s, known, device):
        state["teacher_scored_yt"].append(sum(k is None for k in known))
        return real_logps(teacher, prompts, y_t, y_s, known, device)

    monkeypatch.setattr(dpkd, "sample_teacher", sample_teacher)
    monkeypatch.setattr(dpkd, "teacher_logps", logps)
    return state


def test_second_epoch_needs_no_teacher_sampling_nor_teacher_forward_on_y_t(models, tiny_suite, tmp_path, counts):
    run_distill(_cfg(models, tmp_path / "run"), prompts=tiny_suite.d[:N_PROMPTS])
    assert counts["teacher_samples"] == [BATCH, BATCH]  # epoch 1 only
    assert counts["teacher_scored_yt"] == [BATCH, BATCH, 0, 0]
    (cache_file,) = (tmp_path / "run" / "cache").glob("dpkd-teacher-*.jsonl")
    rows = [json.loads(line) for line in cache_file.read_text().splitlines()[1:]]
    assert sorted(r["index"] for line in rows for r in line["rows"]) == list(range(N_PROMPTS))


def test_cached_teacher_logps_equal_recomputed_ones(models, tiny_suite, tokenizer, tmp_path):
    run_distill(_cfg(models, tmp_path / "run"), prompts=tiny_suite.d[:N_PROMPTS])
    (cache_file,) = (tmp_path / "run" / "cache").glob("dpkd-teacher-*.jsonl")
    header = json.loads(cache_file.read_text().splitlines()[0])
    cache = TeacherCache(cache_file, header["cache_key"], seed=0)
    prompts = [tokenizer(r.prompt, add_special_tokens=False)["input_ids"] for r in tiny_suite.d[:N_PROMPTS]]
    teacher = load_model(str(models / "teacher")).eval()
    for i, p in enumerate(prompts):
        y_t, cached = cache.get(i)
        with torch.no_grad():  # the plain reference: one padded forward of this sequence alone
            tok, _ = _padded_response_token_logps(teacher, collate([Example(p, y_t)], tokenizer.pad_token_id))
        assert abs(tok.sum().item() - cached) <= 1e-5 * max(1.0, abs(cached))


def test_pair_step_with_known_teacher_logps_equals_recomputing_them(models, tokenizer):
    teacher, student = load_model(str(models / "teacher")).eval(), load_model(str(models / "student"))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 300, (int(n),), generator=g).tolist() for n in (5, 9, 3)]
    y_t = [torch.randint(1, 300, (int(n),), generator=g).tolist() for n in (4, 2, 6)]
    y_s = [[torch.randint(1, 300, (int(n),), generator=g).tolist() for n in (3, 7, 1)]]  # K = 1 branch
    cpu = torch.device("cpu")
    p_t, p_s = teacher_logps(teacher, prompts, y_t, y_s, [None] * 3, cpu)
    known = [p_t[0].item(), None, p_t[2].item()]  # a batch mixing cached and new prompts
    p_t2, p_s2 = teacher_logps(teacher, prompts, y_t, y_s, known, cpu)
    assert (p_t2 - p_t).abs().max() <= 1e-5 and (p_s2 - p_s).abs().max() <= 1e-5
    inp = StepInputs(student, student, teacher, [Example(p, []) for p in prompts], SamplingConfig(), MethodConfig(),
                     tokenizer.pad_token_id, tokenizer.eos_token_id, cpu)
    a = pair_step(inp, y_t, y_s, dpkd_pair_loss, p_t, p_s).loss
    b = pair_step(inp, y_t, y_s, dpkd_pair_loss, p_t2, p_s2).loss
    assert abs(a.item() - b.item()) <= 1e-6


def test_killed_run_resumes_with_its_cache_and_ends_with_the_same_weights(models, tiny_suite, tmp_path, monkeypatch):
    prompts = tiny_suite.d[:N_PROMPTS]
    run_distill(_cfg(models, tmp_path / "a"), prompts=prompts)
    calls = {"n": 0}
    real_add = TeacherCache.add

    def add_then_die(self, rows):
        real_add(self, rows)
        calls["n"] += 1
        if calls["n"] == 2:  # after the second step's samples are on disk, before its checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(TeacherCache, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_distill(_cfg(models, tmp_path / "b"), prompts=prompts)
    monkeypatch.undo()
    run_distill(_cfg(models, tmp_path / "b"), prompts=prompts)
    a, b = load_model(str(tmp_path / "a" / "model")), load_model(str(tmp_path / "b" / "model"))
    # Equal up to float32 rounding, not bit for bit: the resumed step finds log p(y_t) in the cache, so the teacher
    # scores the student's samples in a packed forward without y_t's branch, whose rows round differently. Another
    # sample anywhere would move the weights by ~lr = 1e-3.
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_cache_file_cut_mid_write_keeps_whole_events_and_other_settings_are_refused(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = TeacherCache(path, "key-a", seed=0)
    cache.add([(0, [1, 2], -1.5), (3, [4], -0.25)])
    cache.add([(1, [5], -2.0)])
    path.write_bytes(path.read_bytes()[:-5])  # the last event cut mid-line
    again = TeacherCache(path, "key-a", seed=0)
    assert again.get(0) == ([1, 2], -1.5) and again.get(3) == ([4], -0.25) and again.get(1) is None
    again.add([(1, [6], -3.0)])  # appended after the cut line was dropped, not glued to it
    assert TeacherCache(path, "key-a", seed=0).get(1) == ([6], -3.0)
    with pytest.raises(Exception, match="other settings"):
        TeacherCache(path, "key-b", seed=0)
