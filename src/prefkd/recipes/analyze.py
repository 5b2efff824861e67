"""`prefkd analyze noise`: the DPKD paper's Fig. 2 experiment — does reverse KL to the teacher track quality?

The model is perturbed with Gaussian weight noise at several scales (several seeded draws per scale). For every
perturbed model q, on its own samples y_s and on the teacher's samples y_t of the same prompts (teacher p):

- `seq_rkl`: sequence reverse KL per token, mean over prompts of (log q(y_s) - log p(y_s)) / |y_s|;
- `reward_teacher_samples`: the implicit reward r(y_t) = beta/|y_t| (log q(y_t) - log p(y_t)) (DPKD's chosen side);
- `reward_student_samples`: r(y_s), which is exactly beta x seq_rkl; `reward_margin` = r(y_t) - r(y_s);
- `rougeL`: Rouge-L of y_s against the references (the evaluation protocol).

Each is averaged over prompts, then over the sampling seeds (the same seeds for every model). The paper does not
say on which samples its reward is measured; on the model's own samples it would be rKL again, so the plot uses
r(y_t). The unperturbed model's Rouge-L spread over sampling seeds is recorded and drawn: differences between models
smaller than that are sampling noise, not the weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats as scipy_stats
from transformers import PreTrainedModel

from prefkd import atomic, losses
from prefkd.config import opt, section
from prefkd.console import console, progress
from prefkd.data.chat import renderer_for
from prefkd.data.collate import Example, collate
from prefkd.data.loaders import load_instructions
from prefkd.errors import ConfigError
from prefkd.evaluate import rouge_l
from prefkd.generation import SamplingConfig, sample_responses
from prefkd.logprobs import sequence_logps
from prefkd.models import load_model, load_tokenizer, resolve_device
from prefkd.recipes.common import check_same_vocabulary, need, write_run_config


@dataclass
class NoiseConfig:
    scales: list[float] = opt([0.0, 0.01, 0.02, 0.05, 0.1], "noise scales (0 = the model itself, measured once)")
    repeats: int = opt(3, "perturbed models per non-zero scale, each with its own noise draw")
    relative: bool = opt(True, "noise std = scale x the std of each weight tensor (comparable across layers and "
                               "models); false = scale itself")
    seed: int = opt(0, "seed of the noise draws; draw k of scale number i uses seed + 1000 * i + k")


@dataclass
class NoiseRun:
    model: str = opt("", "the model to perturb (path or hub id), usually a student")
    teacher: str = opt("", "the teacher p of the reverse KL and the reward (same tokenizer as the model)")
    data: str = opt("", "records with references (any format `prefkd evaluate` reads)")
    out: str = opt("", "output directory for noise.json and noise.png; default: MODEL/noise")
    n_prompts: int = opt(200, "use the first N records (0 = all)")
    beta: float = opt(0.1, "DPKD's beta in the implicit reward beta/|y| log q(y)/p(y)")
    seeds: list[int] = opt([10, 20, 30], "sampling seeds, the same for every model; values are averaged over them, "
                                         "and the unperturbed model's spread over them shows how much Rouge-L moves "
                                         "without any noise")
    batch_size: int = opt(16, "sequences per log-prob forward pass")
    device: str = opt("auto", "auto (the GPU if there is one), cpu, cuda, ...")
    sampling: SamplingConfig = section(SamplingConfig, "how the teacher and every perturbed model sample")
    noise: NoiseConfig = section(NoiseConfig)


@torch.no_grad()
def perturb(model: PreTrainedModel, original: dict[str, torch.Tensor], scale: float, relative: bool,
            seed: int) -> None:
    """Set every parameter to its original value plus N(0, std^2) noise, std = scale (x the tensor's std if
    `relative`). Drawn on the CPU in parameter order, so a seed gives the same model on any device."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # tied weights appear once, so they stay tied
        base = original[name]
        if scale == 0:
            p.copy_(base)
            continue
        std = scale * (base.float().std().item() if relative and base.numel() > 1 else 1.0)
        noise = torch.randn(base.shape, generator=gen, dtype=torch.float32) * std
        p.copy_(base + noise.to(base.device, base.dtype))


def _context(model: PreTrainedModel) -> int | None:
    return getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)


def response_logps(model: PreTrainedModel, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                   batch_size: int, context: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(summed log-prob, length) of each response after its prompt (cut from the left to fit `context`)."""
    device = next(model.parameters()).device
    examples = [Example(p[-(context - len(r)):] if context and len(p) + len(r) > context else p, r)
                for p, r in zip(prompts, responses, strict=True)]
    sums, lens = [], []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[start: start + batch_size], pad_id).items()}
            s, n = sequence_logps(model, batch)
            sums.append(s.double().cpu().numpy())
            lens.append(n.double().cpu().numpy())
    return np.concatenate(sums), np.concatenate(lens)


def plan(cfg: NoiseConfig) -> list[tuple[float, int, int]]:
    """(scale, draw, noise seed) of every model: scale 0 once, every other scale `repeats` times."""
    out = []
    for i, scale in enumerate(cfg.scales):
        for k in range(1 if scale == 0 else cfg.repeats):
            out.append((float(scale), k, cfg.seed + 1000 * i + k))
    return out


def run_noise(cfg: NoiseRun) -> dict:
    model_path, teacher_path = need(cfg.model, "model"), need(cfg.teacher, "teacher")
    if not cfg.seeds:
        raise ConfigError("seeds must hold at least one sampling seed")
    out = Path(cfg.out) if cfg.out else Path(model_path) / "noise"
    device = resolve_device(cfg.device)
    records = load_instructions(need(cfg.data, "data"))
    records = records[: cfg.n_prompts] if cfg.n_prompts else records
    renderer = renderer_for(load_tokenizer(model_path))
    tokenizer = renderer.tokenizer
    check_same_vocabulary(renderer, renderer_for(load_tokenizer(teacher_path)), "the noise analysis")
    model = load_model(model_path).to(device)
    teacher = load_model(teacher_path).to(device).eval()
    context = min(c for c in (_context(model), _context(teacher), 10**9) if c)
    pad, eos = tokenizer.pad_token_id, renderer.stop_ids_for(teacher)
    prompts = renderer.prompt_ids(records)
    y_t = {seed: sample_responses(teacher, prompts, cfg.sampling, pad, eos, seed) for seed in cfg.seeds}
    p_t = {seed: response_logps(teacher, prompts, y, pad, cfg.batch_size, context) for seed, y in y_t.items()}
    original = {k: v.detach().clone() for k, v in model.named_parameters()}
    rows = []
    models = plan(cfg.noise)
    with progress() as bar:
        task = bar.add_task("noise", total=len(models) * len(cfg.seeds), info="")
        for scale, draw, noise_seed in models:
            perturb(model, original, scale, cfg.noise.relative, noise_seed)
            per_seed = []
            for seed in cfg.seeds:
                y_s = sample_responses(model, prompts, cfg.sampling, pad, eos, seed)
                q_s, n_s = response_logps(model, prompts, y_s, pad, cfg.batch_size, context)
                p_s, _ = response_logps(teacher, prompts, y_s, pad, cfg.batch_size, context)
                q_t, _ = response_logps(model, prompts, y_t[seed], pad, cfg.batch_size, context)
                (p_teacher, n_t) = p_t[seed]
                texts = [tokenizer.decode(y, skip_special_tokens=True).strip() for y in y_s]
                rkl = float(np.mean((q_s - p_s) / np.maximum(n_s, 1)))
                r_t, r_s = _mean_reward(q_t, p_teacher, n_t, cfg.beta), _mean_reward(q_s, p_s, n_s, cfg.beta)
                per_seed.append({"seq_rkl": rkl, "reward_teacher_samples": r_t,
                                 "reward_student_samples": r_s, "reward_margin": r_t - r_s,
                                 "rougeL": float(np.mean([rouge_l(t, r.references)
                                                          for t, r in zip(texts, records, strict=True)])),
                                 "len_student": float(n_s.mean())})
                bar.update(task, advance=1, info=f"scale {scale} draw {draw} seed {seed}")
            row = {"scale": scale, "draw": draw, "noise_seed": noise_seed}
            row.update({k: float(np.mean([x[k] for x in per_seed])) for k in per_seed[0]})
            row["rougeL_per_seed"] = [x["rougeL"] for x in per_seed]
            rows.append(row)
    base = next((r for r in rows if r["scale"] == 0), None)
    seed_std = float(np.std(base["rougeL_per_seed"], ddof=1)) if base and len(cfg.seeds) > 1 else None
    result = {"settings": {"model": model_path, "teacher": teacher_path, "data": cfg.data, "n_prompts": len(records),
                           "beta": cfg.beta, "sampling_seeds": cfg.seeds, "sampling": asdict(cfg.sampling),
                           "noise": asdict(cfg.noise),
                           "len_teacher": float(np.mean([n.mean() for _, n in p_t.values()])),
                           "reward_definition": "beta/|y| (log q(y) - log p(y)), q = perturbed model, p = teacher; "
                                                "y_t = teacher samples, y_s = the perturbed model's own samples; "
                                                "every value is the mean over prompts, then over sampling seeds"},
              "rougeL_seed_std_unperturbed": seed_std,
              "models": rows, "correlation_with_rougeL": correlations(rows)}
    write_run_config(out, cfg)
    atomic.write_json(out / "noise.json", result)
    plot_noise(rows, out / "noise.png", seed_std)
    c = result["correlation_with_rougeL"]
    console.print(f"{len(rows)} models x {len(cfg.seeds)} sampling seeds; Spearman correlation with Rouge-L: "
                  f"seq_rkl {c['seq_rkl']:+.2f}, reward_teacher_samples {c['reward_teacher_samples']:+.2f}"
                  + (f"; the unperturbed model's Rouge-L std over seeds is {seed_std:.2f}" if seed_std is not None
                     else "") + f"; wrote {out}/noise.json, noise.png")
    return result


def _mean_reward(policy: np.ndarray, reference: np.ndarray, lengths: np.ndarray, beta: float) -> float:
    """Mean over prompts of DPKD's implicit reward, the loss's own definition (losses.implicit_reward)."""
    return float(losses.implicit_reward(torch.from_numpy(policy), torch.from_numpy(reference),
                                        torch.from_numpy(lengths), beta).mean())


def correlations(rows: list[dict]) -> dict[str, float]:
    """Spearman rank correlation of each diagnostic with Rouge-L over the models (nan with fewer than 3 models or
    a constant column)."""
    rouge = [r["rougeL"] for r in rows]
    out = {}
    for key in ("seq_rkl", "reward_teacher_samples", "reward_margin"):
        xs = [r[key] for r in rows]
        if len(rows) < 3 or len(set(xs)) < 2 or len(set(rouge)) < 2:
            out[key] = float("nan")
        else:
            out[key] = float(scipy_stats.spearmanr(xs, rouge).statistic)
    return out


def plot_noise(rows: list[dict], png: Path, seed_std: float | None = None) -> None:
    """Left: rKL vs implicit reward of the teacher's samples, coloured by Rouge-L (the paper's Fig. 2).
    Right: rKL vs Rouge-L, coloured by noise scale, with the unperturbed model's spread over sampling seeds.
    The unperturbed model is a star on both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rkl = np.array([r["seq_rkl"] for r in rows])
    reward = np.array([r["reward_teacher_samples"] for r in rows])
    rouge = np.array([r["rougeL"] for r in rows])
    scale = np.array([r["scale"] for r in rows])
    base = scale == 0
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((left, reward, rouge, "viridis", "Rouge-L", "implicit reward of teacher samples  β/|y| log q/p",
               "Implicit reward vs rKL (lighter = higher Rouge-L)"),
              (right, rouge, scale, "plasma", "noise scale", "Rouge-L", "Rouge-L vs rKL"))
    for ax, y, colour, cmap, label, ylabel, title in panels:
        lim = dict(vmin=colour.min(), vmax=colour.max() if np.ptp(colour) > 0 else colour.min() + 1)  # star, dots alike
        sc = ax.scatter(rkl[~base], y[~base], c=colour[~base], cmap=cmap, s=45, edgecolors="black", linewidths=0.4,
                        **lim)
        if base.any():
            ax.scatter(rkl[base], y[base], c=colour[base], cmap=cmap, marker="*", s=220, edgecolors="black",
                       linewidths=0.6, label="unperturbed model", **lim)
            ax.legend(loc="best", fontsize=8)
        fig.colorbar(sc, ax=ax, label=label)
        ax.set_xlabel("sequence reverse KL to the teacher (nats / token)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(5))
    if seed_std is not None and base.any():
        level = float(rouge[base][0])
        right.axhspan(level - seed_std, level + seed_std, color="grey", alpha=0.2,
                      label="unperturbed ± its std over sampling seeds")
        right.legend(loc="best", fontsize=8)
    c = {k: "n/a" if math.isnan(v) else f"{v:+.2f}" for k, v in correlations(rows).items()}
    fig.suptitle(f"{len(rows)} models with Gaussian weight noise. Spearman correlation with Rouge-L: "
                 f"rKL {c['seq_rkl']}, reward {c['reward_teacher_samples']}", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(png)
