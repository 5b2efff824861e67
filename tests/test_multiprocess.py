"""Multi-process training: `accelerate launch` with 2 CPU processes (gloo) gives the single-process loss curve for
the same global batch, for a teacher-forced method (kd) and an on-policy one (dpkd, greedy so both runs draw the
same samples), under DDP and under FSDP2 (configs/accelerate/fsdp.yaml); the weighting that makes it so
(distributed.combine) is exact; and a launch whose processes Accelerate does not see as one is refused."""

import json
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from support import cli_env, tiny_models

from prefkd import distributed
from prefkd.distributed import Term
from prefkd.errors import ConfigError
from prefkd.models import load_model

# Tolerance of the comparison: the two runs add the same numbers in another order (per-process forwards over 4
# instead of 8 sequences, gloo's all-reduce of gradients), so values agree to float32 rounding, not bit for bit.
# Measured: at most 1e-6 apart on the logged values (the log keeps 6 decimals), 1.5e-7 on the weights after 4 steps.
LOG_TOL, WEIGHT_TOL = 1e-4, 1e-5
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


class FakeAccelerator(SimpleNamespace):
    """Process `process_index` of `num_processes`; `reduce` returns the given global sum (or the local vector)."""

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        self.local = tensor
        return self.total if self.total is not None else tensor


def _terms(x, rank_tokens, w):
    """Two token-mean terms over this process's tokens of x (per-token losses), with unequal counts per process."""
    a, b = x[rank_tokens], x[rank_tokens] ** 2
    return [Term("anchor_nll", a.mean(), len(rank_tokens), w[0]), Term("replay_nll", b.mean(), len(rank_tokens), w[1])]


def test_combine_gives_the_single_process_loss_and_gradient():
    x = torch.randn(7, dtype=torch.float64, requires_grad=True)
    w = (0.25, 0.75)
    split = [[0, 2, 3, 5, 6], [1, 4]]  # 5 and 2 tokens: a plain mean of the two local means would be wrong
    one = FakeAccelerator(process_index=0, num_processes=1, device="cpu", total=None)
    loss_1, logged_1 = distributed.combine(one, _terms(x, list(range(7)), w), {"margin": 0.5}, 3)
    grad_1 = torch.autograd.grad(loss_1, x)[0]

    accs = [FakeAccelerator(process_index=r, num_processes=2, device="cpu", total=None) for r in range(2)]
    metrics = [{"margin": 0.2}, {"margin": 1.1}]  # each a mean over 2 and 1 sequences
    for acc, tokens, m, n in zip(accs, split, metrics, (2, 1), strict=True):  # first pass: the local vectors
        distributed.combine(acc, _terms(x, tokens, w), m, n)
    total = accs[0].local + accs[1].local
    losses, logged = [], []
    for acc, tokens, m, n in zip(accs, split, metrics, (2, 1), strict=True):
        acc.total = total
        loss, log = distributed.combine(acc, _terms(x, tokens, w), m, n)
        losses.append(loss)
        logged.append(log)
    mean_loss = (losses[0] + losses[1]) / 2  # what DDP's gradient average differentiates
    assert torch.allclose(mean_loss, loss_1, atol=1e-12, rtol=0)
    assert torch.allclose(torch.autograd.grad(mean_loss, x)[0], grad_1, atol=1e-12, rtol=0)
    for log in logged:  # every process logs the global-batch values
        assert log["anchor_nll"] == pytest.approx(logged_1["anchor_nll"], abs=1e-12)
        assert log["replay_nll"] == pytest.approx(logged_1["replay_nll"], abs=1e-12)
        assert log["loss"] == pytest.approx(logged_1["loss"], abs=1e-12)
        assert log["margin"] == pytest.approx((0.2 * 2 + 1.1 * 1) / 3, abs=1e-12)  # weighted by sequences


def test_sharding_seeds_and_batch_checks():
    accs = [SimpleNamespace(process_index=r, num_processes=2) for r in range(2)]
    batch = [7, 3, 9, 1, 4]
    assert distributed.shard(batch, accs[0]) + distributed.shard(batch, accs[1]) == [7, 9, 4, 3, 1]
    assert distributed.process_seed(5, accs[0]) == 5 != distributed.process_seed(5, accs[1])
    a, b = distributed.shared_generator(5, 11), distributed.shared_generator(5, 11)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
    with pytest.raises(ConfigError, match="fewer than the 2 processes"):
        distributed.check_batch(1, accs[0], "the replay share of the batch")
    distributed.check_batch(2, accs[0], "the replay share of the batch")


def test_deepspeed_gets_batch_and_clipping_from_the_run():
    ds = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_clipping": "auto"}
    acc = SimpleNamespace(distributed_type=distributed.DistributedType.DEEPSPEED, num_processes=4,
                          state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)))
    distributed.configure(acc, batch_size=16, grad_accum=1, max_grad_norm=0.5)
    assert ds == {"train_micro_batch_size_per_gpu": 4, "train_batch_size": 16, "gradient_clipping": 0.5,
                  "gradient_accumulation_steps": 1}
    with pytest.raises(ConfigError, match="train.grad_accum=1"):
        distributed.configure(acc, batch_size=16, grad_accum=2, max_grad_norm=0.5)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    return tiny_models(tmp_path_factory.mktemp("multiprocess"), tokenizer)


def _args(files, method, out):
    return ["distill", "--method", method, f"out={out}", f"student.path={files['student']}",
            f"teacher.path={files['teacher']}", f"data.prompts={files['prompts']}", f"data.replay={files['train']}",
            f"data.corpus={files['corpus']}", "distill.lm_block_size=16", "sampling.max_new_tokens=6",
            "sampling.temperature=0", "sampling.batch_size=4", "train.steps=4", "train.batch_size=8",
            "train.log_every=1", "train.save_every=2", "train.lr=1e-3"]


def _free_port() -> int:
    with socket.socket() as s:  # other test runs on the same machine may hold torchrun's default port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(args, config_file=None) -> str:
    accelerate = Path(sys.executable).parent / "accelerate"
    # --multi_gpu selects accelerate's multi-process (torchrun) launcher; on a machine without GPUs prefkd's
    # Accelerator runs on CPU with gloo (`accelerate launch --cpu` alone would start a single process). A config
    # file (FSDP) selects the same launcher; the flags given here override its GPU settings.
    how = ["--config_file", str(config_file)] if config_file else ["--multi_gpu"]
    cmd = [str(accelerate), "launch", *how, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "prefkd.cli", *args]
    res = subprocess.run(cmd, env=_cpu_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return res.stdout + res.stderr  # prefkd's console writes to stderr


def _run_one(args):
    res = subprocess.run([sys.executable, "-m", "prefkd.cli", *args], env=_cpu_env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]


def _cpu_env() -> dict:
    # Both sides on the CPU (gloo) on any machine: on a one-GPU box two processes cannot share it under NCCL.
    return {**cli_env(), "CUDA_VISIBLE_DEVICES": ""}


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "dpkd"])
def test_two_processes_match_the_single_process_curve(files, tmp_path, method):
    _compare_one_and_two(files, tmp_path, method)


@pytest.mark.slow
def test_fsdp_two_processes_match_the_single_process_curve(files, tmp_path):
    """configs/accelerate/fsdp.yaml on CPU: each process holds half of the student and of the teacher (FSDP2 under
    gloo, distributed.setup), the checkpoint at step 2 is written sharded, and the final model is gathered from the
    shards. kd with teacher samples drawn at temperature 1 (once, seeded, before training: the same in both runs),
    so the divergence goes through the sharded teacher's forward; greedy ones are empty on these tiny models.
    On-policy sampling under FSDP: the next test."""
    output = _compare_one_and_two(files, tmp_path, "kd", CONFIGS / "fsdp.yaml", ["sampling.temperature=1"])
    assert "FSDP2 on CPU: 2 processes" in output  # the config took effect; Accelerate alone would have run DDP
    assert all(row["divergence"] > 0 for row in _log(tmp_path / "two"))


@pytest.mark.slow
def test_fsdp_on_policy_sampling_runs_in_step(files, tmp_path):
    """dpkd under configs/accelerate/fsdp.yaml: each step both processes sample from the sharded student and the
    sharded teacher, whose every forward gathers weights from both. Their prompts differ, and so do their number of
    decoding steps; `generation.InStep` keeps them in step (without it gloo aborts on mismatched collectives). Greedy
    decoding of the same models draws the single process's samples, so the curves match. sampling.batch_size=3:
    each process samples its 4 prompts in two batches (a process with fewer batches: the next test)."""
    output = _compare_one_and_two(files, tmp_path, "dpkd", CONFIGS / "fsdp.yaml", ["sampling.batch_size=3"])
    assert "FSDP2 on CPU: 2 processes" in output


def _compare_one_and_two(files, tmp_path, method, config_file=None, extra=()) -> str:
    single, double = tmp_path / "one", tmp_path / "two"
    _run_one([*_args(files, method, single), *extra])
    output = _launch_two([*_args(files, method, double), *extra], config_file)
    assert json.loads((single / "train_state.json").read_text())["processes"] == 1
    assert json.loads((double / "train_state.json").read_text())["processes"] == 2

    one, two = _log(single), _log(double)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]  # logged once, by the main process
    log_gap = max(abs(a[k] - b[k]) for a, b in zip(one, two, strict=True) for k in a if k not in ("step", "elapsed"))
    terms = ["loss", "anchor_nll", "replay_nll", "lm_loss", "grad_norm"] + \
        (["divergence"] if method == "kd" else ["pref_loss", "reward_chosen", "reward_rejected", "seq_rkl"])
    for a, b in zip(one, two, strict=True):
        assert set(a) == set(b)
        for key in terms:
            assert abs(a[key] - b[key]) <= LOG_TOL, (method, a["step"], key, a[key], b[key])
        assert a["lr"] == b["lr"]  # the schedule steps once per step, not once per process
    m1, m2 = load_model(str(single / "model")), load_model(str(double / "model"))
    for (name, p1), (_, p2) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.allclose(p1, p2, atol=WEIGHT_TOL, rtol=0), (name, (p1 - p2).abs().max().item())
    weight_gap = max((p1 - p2).abs().max().item() for p1, p2 in zip(m1.state_dict().values(),
                                                                      m2.state_dict().values(), strict=True))
    print(f"{method}{' ' + config_file.stem if config_file else ''}: 1 vs 2 processes, largest gap: {log_gap:.1e} "
          f"on the log, {weight_gap:.1e} on the weights")
    return output


@pytest.mark.slow
def test_launch_that_accelerate_runs_as_single_processes_is_refused(files, tmp_path):
    """Two processes launched as torchrun launches them (WORLD_SIZE=2, RANK, LOCAL_RANK, MASTER_*), in which
    Accelerate's state was created without cpu=True on this GPU-less machine, as a program embedding prefkd may do:
    Accelerate then reports DistributedType.NO and 1 process in each, and without the check both would train the
    whole batch into the same output. Each process stops with the reason and the fix, exit 2, writing nothing."""
    out = tmp_path / "run"
    port = _free_port()
    driver = ("import sys; from accelerate import PartialState; PartialState(cpu=False); "
              "from prefkd.cli import app; sys.argv[0] = 'prefkd'; app()")
    procs = []
    try:
        for rank in range(2):
            env = {**_cpu_env(), "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            procs.append(subprocess.Popen([sys.executable, "-c", driver, *_args(files, "kd", out)], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for code, stdout, stderr in results:
        assert code == 2, stdout[-3000:] + stderr[-3000:]
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]  # the console writes to stderr
        assert len(errors) == 1 and "Traceback" not in stderr, stdout + stderr[-3000:]
        for needle in ("WORLD_SIZE=2", "DistributedType.NO", "1 process", "train unsynchronised",
                       "accelerate launch --multi_gpu --num_processes 2"):
            assert needle in errors[0], (needle, errors[0])
    assert not out.exists()  # no model/, no config.yaml, no lock file: the directory claim() made is gone again


# Two processes sample from one FSDP2-sharded GPT-2 (each forward gathers the layers' weights from both), with their
# own prompts: rank 0 three batches, rank 1 one, and responses of different lengths (eight end tokens).
IN_STEP = """
import json, sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import GPT2Config, GPT2LMHeadModel
from prefkd.generation import SamplingConfig, sample_responses
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_layer=2, n_embd=32, n_head=2, n_positions=64, eos_token_id=0,
                                   pad_token_id=0, bos_token_id=0))
for layer in model.transformer.h:
    fully_shard(layer)
fully_shard(model)
prompts, seeds = json.loads(sys.argv[1])
gens = [torch.Generator().manual_seed(s) for s in seeds[rank]]
cfg = SamplingConfig(temperature=1.0, max_new_tokens=12, batch_size=1)
out = sample_responses(model, prompts[rank], cfg, 0, list(range(8)), generators=gens)
with open(sys.argv[2] + f"/rank{rank}.json", "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_sampling_from_a_sharded_model_stays_in_step(tmp_path):
    """Without `generation.InStep`, rank 1 would stop after one batch while rank 0 gathers weights for two more,
    and each batch's processes would stop decoding at different steps: gloo aborts on mismatched collectives. With
    it, each prompt's response is the one the unsharded model draws from the same per-prompt random stream."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from prefkd.generation import SamplingConfig, sample_responses

    prompts = [[[5, 9, 13, 2], [7, 7], [11, 30, 31, 40, 41]], [[3, 12, 20]]]
    seeds = [[101, 102, 103], [104]]
    script = tmp_path / "in_step.py"
    script.write_text(IN_STEP)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(script), json.dumps([prompts, seeds]), str(tmp_path)]
    res = subprocess.run(cmd, env=_cpu_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_layer=2, n_embd=32, n_head=2, n_positions=64,
                                       eos_token_id=0, pad_token_id=0, bos_token_id=0))
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=12, batch_size=4)
    want = [sample_responses(model, p, cfg, 0, list(range(8)), generators=[torch.Generator().manual_seed(s)
                                                                             for s in ss])
            for p, ss in zip(prompts, seeds, strict=True)]
    assert got == want
    lengths = sorted(len(r) for rs in got for r in rs)
    assert lengths[0] < lengths[-1]  # the processes' batches ended at different steps
