"""Benchmark 9: `kd` from offline teacher logits (`teacher.logits`) vs `kd` with the live teacher.

Peak memory and step time of `prefkd distill --method kd` (`run_distill`, the real loop) on 64 of the suite's D
references, teacher GPT-2 `base` (6x384, 11.6M parameters), student GPT-2 `tiny` (2x128, 0.72M), both
random-initialised (kd on fixed sequences samples nothing), batch 8, no replay or LM term. Each measurement is a
fresh child process; the two sides alternate. Peak memory is the child's peak RSS above its RSS after imports
(models, data, optimizer, steps); the step time is the median of the training log's steps after the first. The
cache is built once, before the children, by `run_teacher_logits` (top-32, float16, renorm). The cached child
counts the parameters of every model the recipe loads and fails unless they are the student's alone: no teacher
weight is ever in its memory.

Also measured: the cache's bytes per token for k = 8, 32, 128 (float16, on disk, shard headers included), and (full
run only, or alone with `--accuracy-on RECORDS --teacher T --student S`) how lossless 16 bits are on a trained
teacher (the fixtures' `mini`): the max abs error of the stored log-probs and the relative error of the forward
KL(teacher || student) computed from the cache, float16 and bfloat16 against float32, for top-32 and for the whole
vocabulary.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench import common, fixtures
from prefkd.data.loaders import load_instructions
from prefkd.data.records import write_records
from prefkd.generation import SamplingConfig
from prefkd.losses import forward_kl
from prefkd.losses.top_k import coarse_logits
from prefkd.methods import MethodConfig
from prefkd.models import ModelConfig, load_model
from prefkd.recipes.common import DataConfig
from prefkd.teacher_logits import TeacherLogits

RECORDS = 64
BATCH = 8
K = 32
SIZES = (8, 32, 128)


def _records_file(tmp: Path) -> Path:
    path = tmp / "d.jsonl"
    if not path.is_file():
        records = fixtures.balanced(load_instructions(fixtures.data_dir() / "d.jsonl"), RECORDS)
        write_records(path, records)
    return path


def _models() -> tuple[Path, Path]:
    """Teacher GPT-2 base (6x384) and student GPT-2 tiny (2x128) on the suite's tokenizer, random-initialised:
    kd on fixed references samples nothing, so memory and step time do not depend on training (kept in
    bench/.cache)."""
    from prefkd.models import build_model, load_tokenizer, save_pretrained

    tokenizer = load_tokenizer(str(fixtures.data_dir() / "tokenizer"))
    paths = []
    for name, size, seed in (("teacher", "base", 1), ("student", "tiny", 2)):
        path = fixtures.CACHE / f"teacher_logits-{name}"
        if not (path / "config.json").is_file():
            save_pretrained(build_model("gpt2", size, tokenizer, seed=seed), tokenizer, path)
        paths.append(path)
    return paths[0], paths[1]


def _cache(teacher: Path, records: Path, out: Path, k: int, dtype: str = "float16") -> dict:
    from prefkd.recipes.teacher_logits import TeacherLogitsRun, run_teacher_logits

    return run_teacher_logits(TeacherLogitsRun(model=str(teacher), data=str(records), out=str(out), top_k=k,
                                               dtype=dtype, batch_size=16))


def _kl_from_cache(cache: Path, student, examples, pad: int) -> tuple[float, torch.Tensor]:
    """Forward KL(teacher || student) over all response tokens (renorm), and every stored log-prob."""
    from prefkd.data.collate import collate

    logits = TeacherLogits(cache)
    total, count, stored = 0.0, 0, []
    with torch.no_grad():
        for start in range(0, len(examples), 16):
            ex = examples[start:start + 16]
            batch = collate(ex, pad)
            s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            ids, logps, tail = logits.batch(ex, s.shape[1], s.device)
            mask = batch["response_mask"][:, 1:]
            n = int(mask.sum())
            total += forward_kl(*coarse_logits(s, ids, logps, tail, "renorm"), mask).item() * n
            count += n
            stored.append(logps[mask.bool()])
    return total / count, torch.cat(stored)


def _accuracy(tmp: Path, records: Path, teacher: Path, student_path: Path, limit: int = RECORDS) -> dict:
    """16-bit log-probs against float32 ones: the teacher's caches on the records' references, the KL measured
    against `student_path`."""
    from prefkd.data.chat import renderer_for
    from prefkd.methods.data import reference_examples
    from prefkd.models import load_tokenizer
    from prefkd.train import TrainConfig

    subset = tmp / "accuracy.jsonl"
    write_records(subset, load_instructions(records)[:limit])
    tokenizer = load_tokenizer(str(teacher))
    renderer = renderer_for(tokenizer, "auto")
    examples = reference_examples(renderer, load_instructions(subset), TrainConfig(), str(subset))
    student = load_model(str(student_path)).eval()
    out = {}
    for k in (K, len(tokenizer)):
        name = "top32" if k == K else "full_vocabulary"
        kl, ref = _kl_from_cache(_cache_once(teacher, subset, tmp / f"acc-{k}-float32", k, "float32"), student,
                                 examples, tokenizer.pad_token_id)
        row = {"kl_float32": round(kl, 6)}
        for dtype in ("float16", "bfloat16"):
            kl16, stored = _kl_from_cache(_cache_once(teacher, subset, tmp / f"acc-{k}-{dtype}", k, dtype),
                                          student, examples, tokenizer.pad_token_id)
            finite = torch.isfinite(ref)
            row[f"{dtype}_max_abs_logprob_error"] = float(f"{(stored[finite] - ref[finite]).abs().max().item():.3g}")
            row[f"{dtype}_kl_relative_error"] = float(f"{abs(kl16 - kl) / kl:.3g}")
        out[name] = row
    return out


def _cache_once(teacher: Path, records: Path, out: Path, k: int, dtype: str) -> Path:
    _cache(teacher, records, out, k, dtype)
    return out


def run(quick: bool) -> dict:
    rounds = 1 if quick else 2
    load_before = common.load_avg()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        records = _records_file(tmp)
        teacher, student = _models()
        sizes = {k: _cache(teacher, records, tmp / f"cache-{k}", k) for k in SIZES}
        commands = {side: ["-m", "bench.teacher_logits", "--child", side, "--dir", str(tmp), "--teacher",
                           str(teacher), "--student", str(student), "--steps", str(6 if quick else 10)]
                    for side in ("live", "cached")}
        children = common.run_children(commands, rounds, timeout=1200)
        accuracy = {} if quick else _accuracy(tmp, records, *fixtures.models())
    extra = {side: common.median([r["peak_kb"] - r["base_kb"] for r in rows]) for side, rows in children.items()}
    step = {side: common.median([r["step_s"] for r in rows]) for side, rows in children.items()}
    params = {side: rows[0]["params_loaded"] for side, rows in children.items()}
    figures = {"teacher_logits_memory_ratio": round(extra["cached"] / extra["live"], 3),
               "teacher_logits_step_speedup": round(step["live"] / step["cached"], 2),
               "teacher_logits_bytes_per_token_k32": sizes[K]["bytes_per_token"]}
    settings = {"method": "kd", "records": RECORDS, "batch": BATCH, "teacher": "gpt2 base (random init)",
                "student": "gpt2 tiny", "cache": f"top-{K} float16 renorm", "children_per_side": rounds,
                "threads": torch.get_num_threads()}
    details = {"peak_extra_mb": {s: round(v / 1024, 1) for s, v in extra.items()},
               "median_step_s": {s: round(v, 3) for s, v in step.items()},
               "params_loaded": params,
               "bytes_per_token": {f"top{k}": m["bytes_per_token"] for k, m in sizes.items()},
               "response_tokens": sizes[K]["tokens"], "dtype_accuracy": accuracy,
               "load_avg_start": load_before, "load_avg_end": common.load_avg()}
    common.save("teacher_logits", figures, settings, details)
    rows = [("peak extra memory cached / live", f"{figures['teacher_logits_memory_ratio']}x", "report"),
            ("peak extra MB cached, live", f"{details['peak_extra_mb']['cached']}, {details['peak_extra_mb']['live']}",
             ""),
            ("step time live / cached", f"{figures['teacher_logits_step_speedup']}x", "report"),
            ("parameters loaded cached, live", f"{params['cached']:,}, {params['live']:,}", "student's only"),
            ("bytes per token top-8, 32, 128 (float16)",
             ", ".join(str(sizes[k]["bytes_per_token"]) for k in SIZES), "report"),
            *([("KL rel. error float16, bfloat16 (top-32)",
                f"{accuracy['top32']['float16_kl_relative_error']}, {accuracy['top32']['bfloat16_kl_relative_error']}",
                "report")] if accuracy else [])]
    common.table("9. kd from offline teacher logits vs the live teacher", rows)
    return figures


def child(side: str, tmp: Path, teacher: str, student: str, steps: int) -> None:
    common.set_threads()
    import prefkd.methods.data as method_data
    import prefkd.recipes.distill as distill
    from prefkd.models import n_params
    from prefkd.recipes.distill import DistillRun, TeacherConfig, run_distill
    from prefkd.train import TrainConfig

    loaded = []
    for module in (distill, method_data):
        real = module.load_model

        def counting(path, *a, _real=real, **kw):
            model = _real(path, *a, **kw)
            loaded.append(n_params(model))
            return model

        module.load_model = counting
    student_params = n_params(load_model(student))  # before the measured part; freed at once
    base = common.reset_peak()
    cfg = DistillRun(out=str(tmp / f"run-{side}"), method="kd", student=ModelConfig(path=student),
                     teacher=TeacherConfig(path=teacher, logits=str(tmp / f"cache-{K}") if side == "cached" else ""),
                     data=DataConfig(prompts=str(tmp / "d.jsonl")),
                     train=TrainConfig(steps=steps, batch_size=BATCH, log_every=1, save_every=0),
                     distill=MethodConfig(replay=0.0, lm_weight=0.0), sampling=SamplingConfig())
    cfg.diagnostics.every = 0
    logs = run_distill(cfg, existing="overwrite")
    elapsed = [row["elapsed"] for row in logs]
    times = [b - a for a, b in zip([0.0] + elapsed[:-1], elapsed, strict=True)][1:]
    if side == "cached" and sum(loaded) != student_params:
        raise SystemExit(f"the cached run loaded {sum(loaded)} parameters, the student has {student_params}")
    common.child_report(base_kb=base, params_loaded=sum(loaded), step_s=common.median(times))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=["live", "cached"])
    parser.add_argument("--dir")
    parser.add_argument("--teacher")
    parser.add_argument("--student")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--accuracy-on", metavar="RECORDS", help="alone: the 16-bit accuracy of --teacher's caches "
                        "on RECORDS' references (KL against --student), printed as JSON")
    parser.add_argument("--records", type=int, default=RECORDS)
    a = parser.parse_args()
    if a.accuracy_on:
        import json

        common.set_threads()
        with tempfile.TemporaryDirectory() as tmp_dir:
            print(json.dumps(_accuracy(Path(tmp_dir), Path(a.accuracy_on), Path(a.teacher), Path(a.student),
                                       a.records), indent=2))
    else:
        child(a.child, Path(a.dir), a.teacher, a.student, a.steps)
