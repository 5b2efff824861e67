"""Memory arithmetic for a large-teacher run (default: the DPKD paper's OPT-13B teacher -> OPT-1.3B student) under
the layouts of configs/accelerate/. Estimates from parameter counts and standard byte costs, not measurements.

    python configs/accelerate/memory_plan.py [--gpus 8] [--batch 8] [--max-length 512] [--new-tokens 256]

Costs (bytes): frozen bf16 teacher 2/param; trained student 16/param (fp32 weights 4, fp32 gradients 4, AdamW's two
fp32 moments 8; DeepSpeed's bf16 mode costs the same: 2 weights + 2 gradients + 12 fp32 master/moments); student
activations kept for backward ~34 * tokens * hidden per layer in 16 bit (Korthikanti et al. 2022, with memory-
efficient attention so no seq^2 term) plus logits and their gradient (2 * tokens * vocab * 2); the KV cache while
sampling 2 * layers * hidden * 2 per token. A DPKD step runs the student with gradients on 2 sequences per prompt
(teacher sample and student sample) and the teacher without. `python -m bench.run --only memory_at_scale` measures
these components on a CPU at GPT-2 small and medium shapes and sets them beside this estimate.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Arch:
    """A decoder-only transformer as its config.json gives it (OPT layout: biases, two layer norms per block)."""

    name: str
    layers: int
    hidden: int
    ffn: int
    vocab: int
    positions: int

    @property
    def params(self) -> int:
        h, f = self.hidden, self.ffn
        block = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 2 * 2 * h  # q k v o, fc1, fc2, two layer norms
        # Tied input/output embedding, learned positions (OPT keeps 2 extra rows), final layer norm.
        return self.layers * block + self.vocab * h + (self.positions + 2) * h + 2 * h

    @property
    def block_params(self) -> int:
        return (self.params - self.vocab * self.hidden - (self.positions + 2) * self.hidden) // self.layers


# facebook/opt-13b and facebook/opt-1.3b config.json values.
OPT_13B = Arch("OPT-13B", layers=40, hidden=5120, ffn=20480, vocab=50272, positions=2048)
OPT_1_3B = Arch("OPT-1.3B", layers=24, hidden=2048, ffn=8192, vocab=50272, positions=2048)


def activations(arch: Arch, sequences: int, length: int, value_bytes: int = 2) -> float:
    """`value_bytes` 2: 16-bit activations (bf16 autocast); 4: fp32 (34 counts bytes at 16 bit, so it scales by
    value_bytes / 2)."""
    tokens = sequences * length
    return (arch.layers * 34 * tokens * arch.hidden + 2 * tokens * arch.vocab * 2) * value_bytes / 2


def kv_cache(arch: Arch, sequences: int, length: int, value_bytes: int = 2) -> float:
    return 2 * arch.layers * arch.hidden * value_bytes * sequences * length


def plan(teacher: Arch, student: Arch, gpus: int, batch: int, max_length: int, new_tokens: int) -> list[dict]:
    """GB per GPU (and in CPU memory) for each layout; `batch` prompts per step over all GPUs."""
    prompts = max(1, batch // gpus)
    t_w, s_state = teacher.params * 2, student.params * 16
    act = activations(student, 2 * prompts, max_length) + activations(teacher, 2 * prompts, max_length) / teacher.layers
    kv = max(kv_cache(teacher, prompts, max_length), kv_cache(student, prompts, max_length))  # one sampler at a time
    work = 2 * teacher.block_params * 2  # ZeRO-3 / FSDP: a gathered teacher block and the prefetched next one
    one = activations(student, 2 * batch, max_length) + activations(teacher, 2 * batch, max_length) / teacher.layers
    rows = [
        {"layout": "one GPU, no launch", "gpus": 1, "teacher": t_w, "student": s_state,
         "work": one + max(kv_cache(teacher, batch, max_length), kv_cache(student, batch, max_length)), "cpu": 0},
        {"layout": "ddp.yaml (teacher replicated)", "gpus": gpus, "teacher": t_w, "student": s_state,
         "work": act + kv, "cpu": 0},
        {"layout": "deepspeed-zero3.yaml / fsdp.yaml", "gpus": gpus, "teacher": t_w / gpus, "student": s_state / gpus,
         "work": act + kv + work, "cpu": 0},
        {"layout": "deepspeed-zero3-offload.yaml / fsdp-offload.yaml", "gpus": gpus, "teacher": 0, "student": 0,
         "work": act + kv + work, "cpu": t_w + s_state},
    ]
    for r in rows:
        r["per_gpu"] = r["teacher"] + r["student"] + r["work"]
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| layout | GPUs | teacher | student states | activations + KV + gathered | per GPU | CPU RAM (node) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['gpus']} | {r['teacher'] / GB:.1f} | {r['student'] / GB:.1f} | "
                     f"{r['work'] / GB:.1f} | **{r['per_gpu'] / GB:.1f}** | {r['cpu'] / GB:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="prompts per step, all GPUs together (DPKD recipe: 8)")
    p.add_argument("--max-length", type=int, default=512, help="prompt + response tokens (recipe: 512)")
    p.add_argument("--new-tokens", type=int, default=256, help="sampled tokens per response (recipe: 256)")
    a = p.parse_args()
    print(f"{OPT_13B.name}: {OPT_13B.params / 1e9:.2f}B parameters, {OPT_1_3B.name}: {OPT_1_3B.params / 1e9:.3f}B; "
          f"global batch {a.batch} prompts, {a.max_length} tokens; GB = 1e9 bytes")
    print(table(plan(OPT_13B, OPT_1_3B, a.gpus, a.batch, a.max_length, a.new_tokens)))


if __name__ == "__main__":
    main()
