"""train.report_to: every log row and the resolved config reach TensorBoard, wandb (offline), MLflow (file store)
and Trackio (local store), read back from what each wrote; a missing tracker fails before any work."""

import json
import sqlite3
import struct
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from prefkd import config, rundir, stages, trackers
from prefkd.diagnostics import DiagnosticsConfig
from prefkd.errors import ConfigError
from prefkd.generation import SamplingConfig
from prefkd.methods import MethodConfig
from prefkd.models import ModelConfig, build_model, save_pretrained
from prefkd.recipes.common import DataConfig
from prefkd.recipes.compare import TRAIN_SECTIONS, ExperimentConfig, run_experiment, with_run_group
from prefkd.recipes.distill import DistillRun, run_distill
from prefkd.recipes.sft import SFTRun, run_sft
from prefkd.train import TrainConfig


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("tracker_models")
    for name, size, seed in (("teacher", "micro", 1), ("student", "nano", 2)):
        save_pretrained(build_model("gpt2", size, tokenizer, seed=seed), tokenizer, root / name)
    return root


def _distill(root: Path, out: Path, report_to: str, group: str = "") -> DistillRun:
    return DistillRun(out=str(out), method="kd", student=ModelConfig(path=str(root / "student")),
                      teacher=ModelConfig(path=str(root / "teacher")), data=DataConfig(),
                      train=TrainConfig(steps=4, batch_size=4, lr=1e-3, log_every=2, save_every=0,
                                        report_to=report_to, run_group=group),
                      distill=MethodConfig(replay=0.0, lm_weight=0.0), sampling=SamplingConfig(max_new_tokens=8),
                      diagnostics=DiagnosticsConfig(every=2, prompts=4))


def _scalars(board: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(board))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every numeric value of both jsonl logs as `group/key` -> [(step, value)]: what each tracker must hold."""
    want: dict[str, list[tuple[int, float]]] = {}
    for group, name in (("train", "train_log.jsonl"), ("diagnostics", "diagnostics.jsonl")):
        for row in map(json.loads, (out / name).read_text().splitlines()):
            for key, v in row.items():
                if key != "step":
                    want.setdefault(f"{group}/{key}", []).append((row["step"], v))
    return want


def _same(got: dict, want: dict) -> None:
    assert set(got) == set(want), set(got) ^ set(want)
    for tag, rows in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in rows], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in rows], rel=1e-5), tag


def test_report_to_takes_a_list_or_a_comma_string_and_refuses_unknown_names():
    cfg = config.load(SFTRun, overrides=["train.report_to=TensorBoard, wandb,mlflow"])
    assert cfg.train.report_to == ["tensorboard", "wandb", "mlflow"]
    assert TrainConfig().report_to == ["tensorboard"]
    assert TrainConfig(report_to="none").report_to == ["none"]
    assert trackers.parse("none") == []
    with pytest.raises(ConfigError, match="unknown tracker comet; choose from tensorboard, wandb, trackio, mlflow"):
        config.load(SFTRun, overrides=["train.report_to=tensorboard,comet"])
    with pytest.raises(ConfigError, match="'none' cannot be combined"):
        TrainConfig(report_to=["none", "wandb"])


def test_where_logs_go_changes_no_run_or_stage_key():
    plain, tracked = TrainConfig(), TrainConfig(report_to="wandb,mlflow", run_group="tag1")
    assert stages.settings(tracked) == stages.settings(plain)
    assert "report_to" not in stages.settings(plain) and "lr" in stages.settings(plain)
    # A rerun that only adds a tracker or a Hub repo is the same run to rundir (neither refused nor cleared).
    ignored = (*rundir.IGNORED_KEYS, *stages.unkeyed(SFTRun()))
    assert set(stages.unkeyed(SFTRun())) == {"train.report_to", "train.run_group", "push_to_hub", "hub"}
    pushed = SFTRun(train=tracked, push_to_hub="me/student")
    assert rundir.differences(config.to_dict(SFTRun()), config.to_dict(pushed), ignored) == []
    assert rundir.differences(config.to_dict(SFTRun()), config.to_dict(SFTRun(train=TrainConfig(lr=1.0))), ignored)


def test_compare_groups_every_stage_under_its_tag_or_out_name(tmp_path):
    tagged = with_run_group(ExperimentConfig(out=str(tmp_path / "cmp"), tag="ablation"))
    assert [getattr(tagged, s).run_group for s in TRAIN_SECTIONS] == ["ablation"] * len(TRAIN_SECTIONS)
    untagged = with_run_group(ExperimentConfig(out=str(tmp_path / "cmp")))
    assert {getattr(untagged, s).run_group for s in TRAIN_SECTIONS} == {"cmp"}
    own = with_run_group(ExperimentConfig(out=str(tmp_path / "cmp"), tag="t",
                                          distill_train=TrainConfig(run_group="mine")))
    assert own.distill_train.run_group == "mine" and own.teacher_train.run_group == "t"


@pytest.mark.parametrize("verb", ["sft", "distill", "compare"])
def test_a_missing_tracker_fails_at_start_with_the_pip_command(verb, monkeypatch, models, tmp_path):
    monkeypatch.setattr(trackers, "available", lambda name: name != "mlflow")
    out = tmp_path / "run"
    msg = r"mlflow is not installed: pip install 'prefkd\[tracking\]' \(or: pip install mlflow-skinny\)"
    with pytest.raises(ConfigError, match=msg):
        if verb == "sft":
            # No model or data exist there: the check must come before anything is loaded.
            run_sft(SFTRun(out=str(out), model=ModelConfig(path=str(tmp_path / "nowhere")),
                           train=TrainConfig(report_to="tensorboard,mlflow")))
        elif verb == "distill":
            run_distill(DistillRun(out=str(out), student=ModelConfig(path=str(tmp_path / "nowhere")),
                                   train=TrainConfig(report_to="mlflow")))
        else:
            run_experiment(ExperimentConfig(out=str(out), distill_train=TrainConfig(report_to="mlflow")))
    assert not out.exists()  # nothing was written


def test_every_row_and_the_config_reach_each_tracker_offline(models, tiny_suite, tmp_path, monkeypatch):
    for env, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
                       "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true",
                       "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(env, value)
    for env in ("WANDB_PROJECT", "TRACKIO_PROJECT", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TAGS"):
        monkeypatch.delenv(env, raising=False)
    _trackio_dir(monkeypatch, tmp_path / "trackio")
    out = tmp_path / "grp" / "kd"
    cfg = _distill(models, out, "tensorboard,wandb,mlflow,trackio", group="grp")
    run_distill(cfg, prompts=tiny_suite.d[:8])
    want = _expected(out)
    assert {"train/loss", "train/lr", "diagnostics/reward_margin"} <= set(want)
    assert [s for s, _ in want["diagnostics/reward_margin"]] == [0, 2, 4]

    # TensorBoard: where and how it always wrote (OUT/tensorboard, `train/<key>`), plus the config as text.
    _same(_scalars(out / "tensorboard"), want)
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    assert "config/text_summary" in board.Tags()["tensors"]

    # wandb offline: the run directory under OUT/wandb, its history records read back from the .wandb file.
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    history, run_config, group = _wandb_records(next(run_dir.glob("run-*.wandb")))
    _same(history, want)
    assert run_config["train.lr"] == 1e-3 and run_config["method"] == "kd" and group == "grp"

    # MLflow file store: experiment = the group, one run named after the run directory, metrics and params.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("grp").experiment_id])
    assert run.info.run_name == "grp/kd" and run.info.status == "FINISHED"
    got = {tag: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, tag),
                                                   key=lambda m: m.step)] for tag in run.data.metrics}
    _same(got, want)
    assert run.data.params["train.lr"] == "0.001" and run.data.params["train.report_to"] == \
        "tensorboard,wandb,mlflow,trackio"

    # Trackio's local store: one sqlite database per project under TRACKIO_DIR.
    got, trackio_config = _trackio_records(tmp_path / "trackio" / f"{trackers.PROJECT}.db", "grp/kd")
    _same(got, want)
    assert trackio_config["train.lr"] == 1e-3 and trackio_config["_Group"] == "grp"


def _trackio_dir(monkeypatch, path: Path) -> None:
    """trackio reads TRACKIO_DIR when first imported; an earlier import in this process kept the old one."""
    for name in ("trackio.utils", "trackio.sqlite_storage", "trackio"):
        if name in sys.modules and hasattr(sys.modules[name], "TRACKIO_DIR"):
            monkeypatch.setattr(sys.modules[name], "TRACKIO_DIR", path)


def _wandb_records(path: Path) -> tuple[dict, dict, str]:
    """History, config and group of an offline run, parsed from its .wandb file (wandb ships no Python reader)."""
    from wandb.proto import wandb_internal_pb2

    history: dict[str, list[tuple[int, float]]] = {}
    run_config: dict = {}
    group = ""
    for data in _leveldb_log_records(path.read_bytes()):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            for key, v in items.items():
                if not key.startswith("_"):
                    history.setdefault(key, []).append((items["_step"], v))
        elif kind == "config":
            run_config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "run":
            group = rec.run.run_group
    return history, run_config, group


def _leveldb_log_records(raw: bytes) -> list[bytes]:
    """wandb's datastore: a 7-byte header (":W&B", magic, version), then LevelDB-log blocks of 32 KiB whose chunks
    (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) carry the protobuf records."""
    assert raw[:4] == b":W&B", raw[:7]
    block, pos, records, parts = 32768, 7, [], b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos: pos + 7])
        if length == 0 and kind == 0:
            break
        chunk, pos = raw[pos + 7: pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            records.append(parts)
    return records


def _trackio_records(db: Path, run_name: str) -> tuple[dict, dict]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT * FROM metrics WHERE run_name = ? ORDER BY step", (run_name,)).fetchall()
        configs = conn.execute("SELECT config FROM configs WHERE run_name = ?", (run_name,)).fetchall()
    got: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, v in json.loads(row["metrics"]).items():
            if not key.startswith("_"):
                got.setdefault(key, []).append((row["step"], v))
    return got, json.loads(configs[-1]["config"]) if configs else {}
