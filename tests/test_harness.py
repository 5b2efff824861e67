"""lm-eval-harness on a prefkd student: the saved model directory is all `lm_eval --model hf` needs
(docs/evaluation.md).

The task is local (a task YAML over a jsonl, both written here) and the run is offline, so this checks the path users
take after `prefkd distill` without the hub. lm-eval's numbers are checked against prefkd's own log-probs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import support
import torch

from prefkd.logprobs import group_token_logps
from prefkd.models import load_model, load_tokenizer

TASK = "prefkd_local_mc"
DOCS = [{"question": q, "choices": c} for q, c in [
    ("What colour is the sky on a clear day?", ["blue", "green", "red"]),
    ("Which animal barks?", ["a cat", "a dog", "a fish"]),
    ("How many legs does a spider have?", ["six", "eight", "ten"]),
    ("What do bees make?", ["honey", "milk", "silk"]),
    ("Which planet is closest to the sun?", ["Mercury", "Venus", "Mars"]),
    ("What is frozen water called?", ["steam", "ice", "fog"]),
]]
# Gold = the student's favourite choice for the first N_RIGHT documents and its least favourite for the rest, so a
# correct harness run must report exactly N_RIGHT / len(DOCS), whatever the random weights.
N_RIGHT = 4

# lm-eval's own prompt format for a multiple-choice task: context = doc_to_text, continuation = " " + choice
# (target_delimiter), scored by the summed log-likelihood of the continuation; acc = argmax == gold.
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

# The harness runs in a child process: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are read when huggingface_hub and
# datasets are imported, which the test session has already done, so only a fresh interpreter honours them.
CHILD = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
model, tasks, out, task = sys.argv[1:5]
r = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model},dtype=float32", tasks=[task],
                            task_manager=TaskManager(include_path=tasks), device="cpu", batch_size=4,
                            log_samples=True, bootstrap_iters=0)
samples = [{"doc_id": s["doc_id"], "target": s["target"], "arguments": [list(a) for a in s["arguments"]],
            "loglikelihoods": [float(x[0]) for x in s["filtered_resps"]]} for s in r["samples"][task]]
json.dump({"results": r["results"][task], "samples": samples}, open(out, "w"))
"""


def _prefkd_loglikelihoods(model_dir: Path) -> list[list[float]]:
    """Summed log-prob of " choice" after the prompt, per document and choice, with prefkd.logprobs."""
    model, tok = load_model(str(model_dir), dtype=torch.float32).eval(), load_tokenizer(str(model_dir))
    out = []
    with torch.no_grad():
        for d in DOCS:
            prompt = tok(f"Question: {d['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
            branches = [[tok(" " + c, add_special_tokens=False)["input_ids"]] for c in d["choices"]]
            logps, mask = group_token_logps(model, [prompt], branches)
            out.append((logps * mask).sum(-1).tolist())
    return out


def test_lm_eval_harness_scores_a_saved_student_offline_as_prefkd_does(tmp_path: Path, tokenizer) -> None:
    model_dir = Path(support.save_lm(tmp_path / "run" / "model", tokenizer, seed=3))
    mine = _prefkd_loglikelihoods(model_dir)
    docs = []
    for i, (d, lls) in enumerate(zip(DOCS, mine, strict=True)):
        best = max(range(len(lls)), key=lls.__getitem__)
        worst = min(range(len(lls)), key=lls.__getitem__)
        assert best != worst
        docs.append({**d, "gold": best if i < N_RIGHT else worst})
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))

    env = {**support.cli_env(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
    out = tmp_path / "harness.json"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), str(tasks), str(out), TASK], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())

    assert got["results"]["acc,none"] == N_RIGHT / len(DOCS)
    samples = sorted(got["samples"], key=lambda s: s["doc_id"])
    assert [s["target"] for s in samples] == [d["gold"] for d in docs]
    for s, d, lls in zip(samples, docs, mine, strict=True):
        assert [a[1] for a in s["arguments"]] == [" " + c for c in d["choices"]]
        # Same weights, same tokens, fp32 on the CPU: lm-eval's padded forward and prefkd's packed one agree to
        # float rounding.
        assert s["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
    assert os.listdir(tmp_path / "hf" / "datasets"), "the local jsonl went through the datasets cache set here"
