"""Token-level steps on the scored columns only (`methods.base.shifted_logits`) against the full [B, T, V] path.

One forward + backward of the `kd` step (forward KL, teacher-forced) and of the `gkd` step with lmbda = 0 (the
generalised JSD on the sequences, no sampling: the part of a gkd step the cut changes), each timed in alternation
with the reference computation the step did before: plain forwards with logits on every position, the same loss
function and cross-entropy anchor on the full mask. Random-initialised GPT-2s (student and teacher of the same
shape), prompts and responses of uniform random lengths, fp32, one thread unless BENCH_THREADS says otherwise.
Not part of `bench.run`: a one-off A/B whose ratio is quoted with its command.

    OMP_NUM_THREADS=1 python -m bench.scored_columns --layers 4 --width 256 --vocab 50257 --reps 5
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from bench import common
from prefkd import losses
from prefkd.data.collate import Example, collate
from prefkd.generation import SamplingConfig
from prefkd.logprobs import selective_log_softmax, token_mean_nll
from prefkd.methods import MethodConfig, StepInputs, get_method
from prefkd.methods.on_policy import GKDConfig


def gpt2(layers: int, width: int, vocab: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=width, n_head=max(1, width // 64), vocab_size=vocab,
                                      n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def examples(n: int, prompt: tuple[int, int], response: tuple[int, int], vocab: int, seed: int) -> list[Example]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return torch.randint(1, vocab, (int(torch.randint(lo, hi + 1, (), generator=g)),), generator=g).tolist()

    return [Example(ids(*prompt), ids(*response)) for _ in range(n)]


def full_path(inp: StepInputs, divergence) -> None:
    """What the step computed before the cut: logits on every position, the loss on the full mask."""
    batch = collate(inp.examples, inp.pad_id)
    s = inp.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t = inp.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["response_mask"][:, 1:]
    m = mask.float()
    nll = token_mean_nll(selective_log_softmax(s, batch["input_ids"][:, 1:]) * m, m)  # as nll_from_logits did
    (divergence(s, t, mask) + nll).backward()
    inp.student.zero_grad(set_to_none=True)


def cut_path(inp: StepInputs, method: str) -> None:
    out = get_method(method).step(inp)
    (out.loss + out.anchor_nll).backward()
    inp.student.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=50_257)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, nargs=2, default=(80, 120))
    ap.add_argument("--response", type=int, nargs=2, default=(90, 110))
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    threads = common.set_threads()
    student, teacher = gpt2(args.layers, args.width, args.vocab, 0), gpt2(args.layers, args.width, args.vocab, 1)
    teacher.eval()
    rows = examples(args.batch, tuple(args.prompt), tuple(args.response), args.vocab, 0)
    cfg = MethodConfig(gkd=GKDConfig(lmbda=0.0))
    inp = StepInputs(student, student, teacher, rows, SamplingConfig(), cfg, 0, 0, torch.device("cpu"),
                     shared_rng=torch.Generator().manual_seed(0))
    width = max(len(e.prompt_ids) + len(e.response_ids) for e in rows)
    start = min(len(e.prompt_ids) for e in rows) - 1
    result = {"machine": common.machine()["cpu"], "threads": threads, "T": width, "scored_columns": width - 1 - start,
              "settings": vars(args)}
    divergences = {"kd": lambda s, t, m: losses.forward_kl(s, t, m),
                   "gkd": lambda s, t, m: losses.generalized_jsd(s, t, m, cfg.gkd.beta, cfg.gkd.temperature)}
    for method, divergence in divergences.items():
        times = common.alternate({"full": lambda d=divergence: full_path(inp, d),
                                  "cut": lambda m=method: cut_path(inp, m)}, reps=args.reps)
        full, cut = common.median(times["full"]), common.median(times["cut"])
        result[method] = {"full_s": round(full, 3), "cut_s": round(cut, 3), "speedup": round(full / cut, 3),
                          **{f"{k}_all": [round(x, 3) for x in v] for k, v in times.items()}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
