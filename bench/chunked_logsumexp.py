"""The backward of a chunked logsumexp: chunks sliced in a loop (`logits[s: s + step]`, what `logprobs.logsumexp_rows`
did) against `logits.split(step)` (what it does), and one `torch.logsumexp` over the whole tensor, on random
`[N, V]` fp32 logits with `logprobs.CHUNK_ELEMENTS` per chunk. Each slice's backward builds a zero gradient of the
whole tensor and adds it up (chunks x N x V work); split's writes every chunk into one. Medians of alternating
repetitions, one thread unless BENCH_THREADS says otherwise. Not part of `bench.run`: a one-off A/B quoted with its
command.

    OMP_NUM_THREADS=1 python -m bench.chunked_logsumexp --positions 1808 --vocab 50257 --reps 3
"""

from __future__ import annotations

import argparse
import json

import torch

from bench import common
from prefkd.logprobs import CHUNK_ELEMENTS, _chunk_positions, logsumexp_rows


def sliced(logits: torch.Tensor, step: int) -> torch.Tensor:
    return torch.cat([torch.logsumexp(logits[s: s + step].float(), dim=-1) for s in range(0, logits.shape[0], step)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--positions", type=int, default=1808)
    ap.add_argument("--vocab", type=int, default=50_257)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    threads = common.set_threads()
    logits = torch.randn(args.positions, args.vocab, requires_grad=True)
    upstream = torch.randn(args.positions)
    step = _chunk_positions(args.vocab, CHUNK_ELEMENTS)
    forms = {"sliced": lambda: sliced(logits, step), "split": lambda: logsumexp_rows(logits),
             "one_logsumexp": lambda: torch.logsumexp(logits, dim=-1)}

    def backward(form):
        def call():
            logits.grad = None
            (form() * upstream).sum().backward()
        return call

    times = common.alternate({k: backward(f) for k, f in forms.items()}, reps=args.reps)
    print(json.dumps({"machine": common.machine()["cpu"], "threads": threads, "chunks": -(-args.positions // step),
                      "settings": vars(args),
                      "forward_backward_s": {k: round(common.median(v), 3) for k, v in times.items()}}))


if __name__ == "__main__":
    main()
