"""`prefkd demo`: the embedded suite end to end.

Stages (each reused on a rerun with the same --out when its inputs are unchanged):
  data     -> suite shards + byte-level BPE tokenizer
  teacher  -> SFT of the larger model on D0 and D references (it knows more)
  sft      -> SFT of the smaller student on D0 only
  <method> -> distillation of the SFT student on D's prompts (e.g. dpkd)
  eval     -> sampled generation on the test split over several seeds; results.json, report.md
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from prefkd import atomic, config, stages
from prefkd.config import opt, section
from prefkd.console import console
from prefkd.data.collate import Example, encode_examples, encode_prompts
from prefkd.data.corpus import token_blocks
from prefkd.data.records import Instruction, read_records, write_records
from prefkd.data.synthetic import Suite, SuiteConfig, build_suite
from prefkd.evaluate import EvalConfig, evaluate
from prefkd.generation import SamplingConfig
from prefkd.methods import MethodConfig, get_method
from prefkd.models import (
    ModelConfig,
    build_model,
    load_model,
    load_tokenizer,
    n_params,
    train_tokenizer,
)
from prefkd.report import write_report
from prefkd.train import RunData, TrainConfig, train


def _train_cfg(**kw) -> TrainConfig:
    return TrainConfig(**kw)


@dataclass
class DemoConfig:
    out: str = opt("runs/demo", "output directory; a rerun reuses its finished stages")
    methods: list[str] = opt(["dpkd"], "distillation methods to run from the SFT student")
    vocab_size: int = opt(2048, "byte-level BPE vocabulary trained on the suite")
    suite: SuiteConfig = section(SuiteConfig)
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(size="small"))
    student: ModelConfig = field(default_factory=lambda: ModelConfig(size="tiny"))
    teacher_train: TrainConfig = field(default_factory=lambda: _train_cfg(steps=1200, batch_size=32, lr=1e-3,
                                                                          bf16=True, save_every=200))
    student_train: TrainConfig = field(default_factory=lambda: _train_cfg(steps=600, batch_size=32, lr=1e-3,
                                                                          save_every=200))
    distill_train: TrainConfig = field(default_factory=lambda: _train_cfg(steps=300, batch_size=16, lr=5e-4,
                                                                          save_every=100))
    method: MethodConfig = section(MethodConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=160))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(
        seeds=[10, 20, 30], sampling=SamplingConfig(max_new_tokens=160, batch_size=64)))


def _examples(tokenizer, records: list[Instruction], cfg: TrainConfig, prompts_only: bool = False) -> list[Example]:
    if prompts_only:
        return [Example(p, []) for p in encode_prompts(tokenizer, [r.prompt for r in records])]
    ex, dropped = encode_examples(tokenizer, [r.prompt for r in records], [r.references[0] for r in records],
                                  cfg.max_prompt_tokens, cfg.max_length)
    if dropped:
        console.print(f"dropped {dropped} examples over the length limits")
    return ex


def prepare_data(cfg: DemoConfig, out: Path) -> None:
    data_dir = out / "data"
    key = stages.fingerprint(asdict(cfg.suite), cfg.vocab_size)
    if stages.is_done(data_dir, key):
        return
    suite: Suite = build_suite(cfg.suite)
    for name in ("d0", "d", "validation", "test"):
        write_records(data_dir / f"{name}.jsonl", getattr(suite, name))
    atomic.write_text(data_dir / "corpus.txt", "\n\n".join(suite.corpus))
    texts = [r.prompt + r.references[0] for r in suite.d0 + suite.d] + suite.corpus
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    with atomic.directory(data_dir / "tokenizer") as tmp:
        tokenizer.save_pretrained(tmp)
    stages.mark_done(data_dir, key, {"sizes": {n: len(getattr(suite, n)) for n in ("d0", "d", "validation", "test")}})


def run_demo(cfg: DemoConfig) -> dict:
    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "config.yaml", _yaml(cfg))
    prepare_data(cfg, out)
    data_key = stages.fingerprint(asdict(cfg.suite), cfg.vocab_size)
    tokenizer = load_tokenizer(str(out / "data" / "tokenizer"))
    d0 = read_records(out / "data" / "d0.jsonl", require_references=True)
    d = read_records(out / "data" / "d.jsonl", require_references=True)
    test = read_records(out / "data" / "test.jsonl", require_references=True)

    def sft_stage(name: str, mcfg: ModelConfig, tcfg: TrainConfig, records: list[Instruction]) -> str:
        key = stages.fingerprint(data_key, asdict(mcfg), asdict(tcfg))
        if not stages.is_done(out / name, key):
            model = build_model(mcfg.arch, mcfg.size, tokenizer, mcfg.max_positions, tcfg.seed)
            console.print(f"[bold]{name}[/]: {mcfg.arch}-{mcfg.size}, {n_params(model) / 1e6:.2f}M parameters, "
                          f"SFT on {len(records)} records")
            logs = train(get_method("sft"), model, tokenizer, RunData(_examples(tokenizer, records, tcfg)), tcfg,
                         cfg.method, cfg.sampling, out / name, name=f"{name} SFT")
            stages.mark_done(out / name, key, {"final": logs[-1] if logs else {}})
        return key

    keys = {"teacher": sft_stage("teacher", cfg.teacher, cfg.teacher_train, d0 + d),
            "sft": sft_stage("sft", cfg.student, cfg.student_train, d0)}
    corpus_docs = (out / "data" / "corpus.txt").read_text(encoding="utf-8").split("\n\n")
    for method_name in cfg.methods:
        method = get_method(method_name)
        key = stages.fingerprint(keys["teacher"], keys["sft"], method_name, asdict(cfg.method),
                                 asdict(cfg.distill_train), asdict(cfg.sampling))
        keys[method_name] = key
        if stages.is_done(out / method_name, key):
            continue
        student = load_model(str(out / "sft" / "model"))
        teacher = load_model(str(out / "teacher" / "model")) if method.needs_teacher else None
        tcfg = cfg.distill_train
        data = RunData(_examples(tokenizer, d, tcfg, prompts_only=not method.uses_references),
                       replay=_examples(tokenizer, d0, tcfg),
                       corpus=token_blocks(tokenizer, corpus_docs, cfg.method.lm_block_size))
        console.print(f"[bold]{method_name}[/]: from the SFT student, on {len(d)} D prompts "
                      f"(kappa {cfg.method.kappa}, replay {cfg.method.replay}, lm_weight {cfg.method.lm_weight})")
        logs = train(method, student, tokenizer, data, tcfg, cfg.method, cfg.sampling, out / method_name, teacher,
                     name=method_name)
        stages.mark_done(out / method_name, key, {"final": logs[-1] if logs else {}})

    rows = []
    for name in ["teacher", "sft", *cfg.methods]:
        eval_dir = out / "eval" / name
        key = stages.fingerprint(keys[name], asdict(cfg.eval))
        if not stages.is_done(eval_dir, key):
            model = load_model(str(out / name / "model"))
            scores, preds = evaluate(model, tokenizer, test, cfg.eval, name)
            atomic.write_json(eval_dir / "scores.json", scores)
            atomic.write_json(eval_dir / "predictions.json",
                              {str(s): [{"id": r.id, "prediction": p} for r, p in zip(test, ps, strict=True)]
                               for s, ps in preds.items()})
            stages.mark_done(eval_dir, key)
        scores = _read_json(eval_dir / "scores.json")
        rows.append({"name": name, "rougeL": scores["all"]["rougeL"], "exact_match": scores["all"]["exact_match"],
                     "breakdown": scores})
    results = {"wall_seconds": round(time.time() - t0, 1), "rows": rows, "seeds": cfg.eval.seeds,
               "torch_threads": torch.get_num_threads()}
    atomic.write_json(out / "results.json", results)
    write_report(out, results, cfg)
    return results


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def _yaml(cfg: DemoConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(cfg), sort_keys=False)
