"""configs/accelerate/*.yaml go through accelerate's own launch-time parsing: known keys only, the intended
distributed type, and (FSDP) a plugin built from exactly what `accelerate launch` would export. DeepSpeed itself is
not installed here, so its configs are checked up to the plugin's resolved config."""

import os
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin, prepare_multi_gpu_env
from accelerate.utils.launch import prepare_deepspeed_cmd_env

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
EXPECTED = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "fsdp-offload": "FSDP", "deepspeed-zero3": "DEEPSPEED",
            "deepspeed-zero3-offload": "DEEPSPEED"}


def _launch_args(path):
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(path), "train.py"])
    # As on an 8-GPU machine: the checks that need no GPU are the ones that matter here.
    with mock.patch("torch.cuda.is_available", return_value=True), mock.patch("torch.cuda.device_count",
                                                                                return_value=8):
        args, defaults, _ = _validate_launch_command(args)
    return parser, args, defaults


def test_every_config_is_listed():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_with_known_keys(name):
    path = CONFIGS / f"{name}.yaml"
    cluster = ClusterConfig.from_yaml_file(str(path))  # unknown top-level keys raise
    assert cluster.distributed_type == EXPECTED[name] and cluster.mixed_precision == "bf16"
    parser, args, _ = _launch_args(path)
    known = {a.dest for a in parser._actions}
    for section in (cluster.fsdp_config or {}), (cluster.deepspeed_config or {}):
        assert not set(section) - known, f"{name}: keys accelerate launch does not know: {set(section) - known}"
    assert args.num_processes == 8


@pytest.mark.parametrize("name, offload", [("fsdp", False), ("fsdp-offload", True)])
def test_fsdp_configs_build_an_fsdp2_plugin(name, offload):
    _, args, _ = _launch_args(CONFIGS / f"{name}.yaml")
    with mock.patch.dict(os.environ, prepare_multi_gpu_env(args)):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert type(plugin.cpu_offload).__name__ == ("CPUOffloadPolicy" if offload else "OffloadPolicy")
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"


@pytest.mark.parametrize("name, offload", [("deepspeed-zero3", "none"), ("deepspeed-zero3-offload", "cpu")])
def test_deepspeed_configs_resolve_to_zero3(name, offload):
    _, args, defaults = _launch_args(CONFIGS / f"{name}.yaml")
    # What `accelerate launch` does before handing over to the DeepSpeed launcher.
    args.deepspeed_fields_from_accelerate_config = ",".join([*defaults.deepspeed_config, "mixed_precision"])
    _, env = prepare_deepspeed_cmd_env(args)
    with mock.patch.dict(os.environ, env):
        ds = DeepSpeedPlugin().deepspeed_config
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == offload
    assert ds["gradient_accumulation_steps"] == 1


def test_memory_plan_counts_the_opt_parameters_and_names_real_configs(monkeypatch):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("memory_plan", CONFIGS / "memory_plan.py")
    plan = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "memory_plan", plan)  # dataclasses look their module up there
    spec.loader.exec_module(plan)
    # The published sizes: OPT-13B has 12.85B parameters, OPT-1.3B 1.3B.
    assert round(plan.OPT_13B.params / 1e9, 2) == 12.85 and round(plan.OPT_1_3B.params / 1e9, 1) == 1.3
    rows = plan.plan(plan.OPT_13B, plan.OPT_1_3B, gpus=8, batch=8, max_length=512, new_tokens=256)
    for row in rows:
        for name in row["layout"].replace("/", " ").split():
            if name.endswith(".yaml"):
                assert (CONFIGS / name).is_file(), name
    sharded = next(r for r in rows if r["layout"].startswith("deepspeed-zero3.yaml"))
    assert sharded["teacher"] == plan.OPT_13B.params * 2 / 8
    # The fp32 form (bench/memory_at_scale.py) of the 16-bit formulas, written out: 34 bytes per token, width and
    # layer at 16 bit plus logits and their gradient; keys and values of every layer.
    arch, seqs, length = plan.OPT_1_3B, 4, 100
    tokens = seqs * length
    assert plan.activations(arch, seqs, length) == arch.layers * 34 * tokens * 2048 + 2 * tokens * 50272 * 2
    assert plan.activations(arch, seqs, length, value_bytes=4) == 2 * plan.activations(arch, seqs, length)
    assert plan.kv_cache(arch, seqs, length, value_bytes=4) == 2 * 24 * 2048 * 4 * tokens


# FSDP2 samples in step (generation.InStep; tests/test_multiprocess.py runs dpkd under it); ZeRO-3 is refused.
@pytest.mark.parametrize("kind, stage, refused", [("FSDP", None, False), ("DEEPSPEED", 3, True),
                                                  ("DEEPSPEED", 2, False), ("MULTI_CPU", None, False)])
def test_on_policy_methods_are_refused_under_zero3(kind, stage, refused):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from prefkd.distributed import check_sampling_supported
    from prefkd.errors import ConfigError

    acc = SimpleNamespace(distributed_type=DistributedType[kind],
                          state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))
    check_sampling_supported(acc, "kd", False)  # cached samples: fine everywhere
    if refused:
        with pytest.raises(ConfigError, match="'dpkd' samples from the models during training.*fsdp.yaml"):
            check_sampling_supported(acc, "dpkd", True)
    else:
        check_sampling_supported(acc, "dpkd", True)
