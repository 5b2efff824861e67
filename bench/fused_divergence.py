"""The divergences' fused path (`losses.divergences._FusedPositions`) against autograd through the same formulas.

Forward + backward of forward_kl, reverse_kl, generalized_jsd (beta 0.5), DistiLLM's skew KLs (alpha 0.1) and AKL
(mu 0.5) on random student and teacher logits of shape [batch, positions, vocab] (the teacher without gradient, as
in training), a few positions masked out; the two paths alternate, `reps` times each after a warm-up, in one
process. Prints each path's median seconds and the ratio, and for AKL how long its head takes found from each row's
top candidates against a sort of every whole row (`divergences._head_mask`, `_sorted_head`). Not part of
`bench.run`: a one-off A/B whose ratio is quoted with its command.

    OMP_NUM_THREADS=1 python -m bench.fused_divergence --batch 8 --positions 128 --vocab 50257 --reps 3
    OMP_NUM_THREADS=1 python -m bench.fused_divergence --only adaptive_kl --teacher-scale 6   # a peaked teacher
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

import torch

from bench import common
from prefkd import losses
from prefkd.losses import divergences

LOSSES = {"forward_kl": lambda s, t, m: losses.forward_kl(s, t, m),
          "reverse_kl": lambda s, t, m: losses.reverse_kl(s, t, m),
          "gjsd_0.5": lambda s, t, m: losses.generalized_jsd(s, t, m, beta=0.5),
          "skew_forward_kl": lambda s, t, m: losses.skew_forward_kl(s, t, m),
          "skew_reverse_kl": lambda s, t, m: losses.skew_reverse_kl(s, t, m),
          "adaptive_kl": lambda s, t, m: losses.adaptive_kl(s, t, m)}


@contextmanager
def autograd_path():
    fusable = divergences._fusable
    divergences._fusable = lambda teacher_logits, temperature=1.0: False
    try:
        yield
    finally:
        divergences._fusable = fusable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--positions", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=list(LOSSES), help="losses to time (default: all)")
    parser.add_argument("--teacher-scale", type=float, default=1.0,
                        help="teacher logits ~ N(0, scale^2): 1 gives a flat distribution over the vocabulary, 6 a "
                             "peaked one like a trained model's (AKL's head is then a few tokens)")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    student = torch.randn(args.batch, args.positions, args.vocab, generator=g).requires_grad_()
    teacher = torch.randn(args.batch, args.positions, args.vocab, generator=g) * args.teacher_scale
    mask = torch.ones(args.batch, args.positions, dtype=torch.bool)
    mask[:, -args.positions // 8:] = False  # padding after the shorter responses

    rows = []
    for name, fn in LOSSES.items():
        if args.only and name not in args.only:
            continue
        def step(fn=fn):
            fn(student, teacher, mask).backward()
            student.grad = None

        def plain(step=step):
            with autograd_path():
                step()

        times = common.alternate({"fused": step, "autograd": plain}, reps=args.reps, warmup=1)
        fused, plain_s = common.median(times["fused"]), common.median(times["autograd"])
        rows.append((f"{name}: autograd path / fused path", f"{plain_s / fused:.2f}x ({plain_s:.2f} s / {fused:.2f} s)",
                     ""))
    if not args.only or "adaptive_kl" in args.only:  # AKL's head: the whole rows sorted, or the top candidates
        p = torch.softmax(teacher.reshape(-1, args.vocab), -1)
        heads = common.alternate({"candidates": lambda: divergences._head_mask(p, 0.5),
                                  "sorted": lambda: divergences._sorted_head(p, 0.5, "official")},
                                 reps=args.reps, warmup=1)
        cand, whole = common.median(heads["candidates"]), common.median(heads["sorted"])
        size = divergences._head_mask(p, 0.5).sum(-1).float()
        rows.append(("adaptive_kl's head (mu 0.5): whole-row sort / top candidates",
                     f"{whole / cand:.2f}x ({whole:.2f} s / {cand:.2f} s; head of {size.median():.0f} tokens, "
                     f"median)", ""))
    common.table(f"Divergences, forward + backward, [{args.batch}, {args.positions}, {args.vocab}], teacher logits "
                 f"x {args.teacher_scale}, {torch.get_num_threads()} thread(s)", rows)


if __name__ == "__main__":
    main()
