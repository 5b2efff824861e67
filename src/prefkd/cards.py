"""Hugging Face model cards for saved students, and uploads to the Hub.

A card (`README.md` in the model directory) is built from a run's config (what `config.yaml` holds) and, once the
model is evaluated, from the evaluation directory's scores.json / settings.json. Metadata go through
huggingface_hub's `ModelCardData` (and `EvalResult` for `model-index`), so the YAML is what the Hub expects.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from prefkd import atomic
from prefkd.config import opt
from prefkd.errors import PrefkdError

CARD = "README.md"
# Metric -> (label in the table, Hub metric id for model-index or None, its metric_config). Rouge is in the Hub's
# metric list as `rouge` (config rougeL) and exact match as `exact_match`; the judge's win rate and score are
# prefkd's own, so they stay in the table only.
METRICS: dict[str, tuple[str, str | None, str | None]] = {
    "rougeL": ("Rouge-L", "rouge", "rougeL"),
    "exact_match": ("Exact match", "exact_match", None),
    "win_rate": ("Judge win rate", None, None),
    "judge_score": ("Judge score", None, None),
}
# Suffixes that mark a data source as a local file (as prefkd.data.loaders reads them), never a hub dataset id.
_FILE_SUFFIXES = {".json", ".jsonl", ".csv", ".parquet", ".tsv", ".txt", ".gz", ".zst", ".arrow"}
_TOKEN_LIKE = re.compile(r"^hf_[A-Za-z0-9]{20,}$")


@dataclass
class HubConfig:
    private: bool = opt(False, "push_to_hub: create the repo as private")
    token: str = opt("HF_TOKEN", "push_to_hub: NAME of the environment variable holding the Hub token (never the "
                                 "token itself); unset variable: the login saved by `hf auth login`")


def check_push(repo_id: str, hub: HubConfig) -> None:
    """Before any work: a push that can only fail (bad repo id, a token pasted as hub.token) is refused now, and a
    token never reaches config.yaml."""
    if _TOKEN_LIKE.match(hub.token):
        raise PrefkdError("hub.token takes the NAME of an environment variable, not the token: export HF_TOKEN=... "
                          "(or another variable) and pass hub.token=HF_TOKEN; nothing was written")
    if repo_id:
        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            raise PrefkdError(f"push_to_hub={repo_id!r} is not a Hub repo id; pass user/name or org/name") from None
        if "/" not in repo_id:
            raise PrefkdError(f"push_to_hub={repo_id!r}: pass the full repo id, user/name or org/name")


def hub_id(value: str) -> str | None:
    """`value` when it names a Hub repo (model or dataset id), None for a local path or anything else."""
    if not value or Path(value).expanduser().exists() or value.startswith(("/", "./", "../", "~")):
        return None
    if Path(value).suffix.lower() in _FILE_SUFFIXES:
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value


def _kind(run: dict) -> str:
    if "method" in run and "student" in run:
        return "distill"
    if "model" in run and "block_size" in run:
        return "sft"
    raise PrefkdError("the run's config is not one of `prefkd sft` or `prefkd distill`: pass the output directory "
                      "of one of those (it holds config.yaml and model/)")


def _base_model(path: str) -> tuple[str | None, str]:
    """(base_model metadata, a sentence for the body). A hub id is the base; a local directory's own card names the
    hub model it descends from, if any (a local path means nothing on the Hub, and would leak the file system)."""
    if not path:
        return None, "built from scratch (no base model)"
    if hid := hub_id(path):
        return hid, f"started from [`{hid}`](https://huggingface.co/{hid})"
    card = Path(path) / CARD
    inherited = None
    if card.is_file():
        try:
            inherited = ModelCard.load(card).data.base_model
        except Exception:  # any unreadable card: the local path alone is still true
            inherited = None
    if isinstance(inherited, list):
        inherited = inherited[0] if inherited else None
    if inherited:
        return inherited, f"started from the local model `{path}`, itself derived from `{inherited}`"
    return None, f"started from the local model `{path}` (its card names no Hub base model)"


def _method_settings(method: Any, distill: dict) -> dict[str, Any]:
    """The method's own config sections (named by its key_params, or its name) and the shared mix."""
    sections = {p.split(".")[0] for p in re.findall(r"\b([a-z_]+)\.[a-z_]+", method.key_params)}
    if method.name in distill and isinstance(distill[method.name], dict):
        sections.add(method.name)
    out = {f"distill.{s}.{k}": v for s in sorted(sections) if isinstance(distill.get(s), dict)
           for k, v in distill[s].items()}
    if method.auxiliary_losses:
        out.update({f"distill.{k}": distill[k] for k in ("kappa", "replay", "lm_weight") if k in distill})
    return out


def _table(rows: list[tuple[str, Any]]) -> str:
    return "\n".join(["| setting | value |", "|---|---|", *(f"| `{k}` | `{v}` |" for k, v in rows)])


def results_table(scores: dict) -> str:
    """Rouge-L, exact match (and a judge's numbers) over all prompts, with their 95% intervals."""
    overall = scores["all"]
    lines = ["| metric | mean | std over seeds | 95% t interval (seeds) | 95% bootstrap interval (prompts x seeds) |",
             "|---|---|---|---|---|"]
    for m, (label, _, _) in METRICS.items():
        if m in overall:
            s = overall[m]
            boot = s.get("ci95_bootstrap")
            lines.append(f"| {label} | {s['mean']:.2f} | {s['std']:.2f} | {s['ci95'][0]:.2f} to {s['ci95'][1]:.2f} | "
                         + (f"{boot[0]:.2f} to {boot[1]:.2f} |" if boot else "- |"))
    return "\n".join(lines)


def _eval_results(scores: dict, settings: dict) -> list[EvalResult]:
    data = str(settings.get("data", "evaluation data"))
    dataset = hub_id(data)
    return [EvalResult(task_type="text-generation", dataset_type=dataset or "local", dataset_name=Path(data).name,
                       metric_type=hub_metric, metric_name=label, metric_config=config,
                       metric_value=round(scores["all"][m]["mean"], 4))
            for m, (label, hub_metric, config) in METRICS.items() if hub_metric and m in scores.get("all", {})]


def model_card(run: dict, scores: dict | None = None, settings: dict | None = None, name: str = "") -> ModelCard:
    """The card of a `prefkd sft` or `prefkd distill` run (`run` as config.yaml holds it), with the results of an
    evaluation (scores.json / settings.json) when given."""
    from prefkd.methods import get_method  # the registry pulls in torch; not needed to import this module

    kind = _kind(run)
    train, data = run.get("train", {}), run.get("data", {})
    if kind == "distill":
        method = get_method(run["method"])
        start = run["student"].get("path", "")
        teacher = run.get("teacher", {}).get("path", "") or "(none)"
        how = "white-box: the teacher's token distributions" if method.needs_teacher else \
            "black-box: the teacher's samples only"
        settings_rows = list(_method_settings(method, run.get("distill", {})).items())
        sources = [("prompts", data.get("prompts", ""))]
        if method.auxiliary_losses:
            sources += [("replay", data.get("replay", "")), ("LM corpus", data.get("corpus", ""))]
        method_line = f"`{method.name}`: {method.description} ({method.paper})"
        tags = ["distillation", "prefkd", method.name]
    else:
        method = get_method("sft")
        start = run["model"].get("path", "")
        teacher, how, settings_rows = "(none)", "", []
        pretraining = bool(data.get("corpus")) and not data.get("train")
        if pretraining:
            method_line = "LM pretraining on a text corpus (`prefkd sft` with data.corpus): every token scored"
            sources = [("corpus", data["corpus"])]
            settings_rows.append(("block_size", run.get("block_size")))
        else:
            method_line = f"`sft`: {method.description} ({method.paper})"
            sources = [("references", data.get("train", ""))]
        tags = ["distillation", "prefkd", "sft"]
    settings_rows += [(f"train.{k}", train.get(k)) for k in ("lr", "steps", "batch_size", "grad_accum", "seed")
                      if k in train]
    if run.get("lora", {}).get("r"):
        settings_rows += [(f"lora.{k}", v) for k, v in run["lora"].items()]
    base, started = _base_model(start)
    if not start and kind == "sft":
        m = run["model"]
        started = f"built from scratch: {m.get('arch')} {m.get('size')}, no base model"
    sources = [(what, src) for what, src in sources if src]
    datasets = sorted({d for _, src in sources if (d := hub_id(src))})
    name = name or "prefkd student"

    results, eval_results = "", None
    if scores is not None:
        settings = settings or {}
        generation = settings.get("generation") or {}
        n = settings.get("n_records", scores["all"]["n"])
        results = ("\n## Results\n\n"
                   f"`prefkd evaluate` on `{settings.get('data', '?')}` ({n} prompts), "
                   f"sampling seeds {settings.get('seeds', '?')}, "
                   f"{(generation.get('sampling') or {}).get('max_new_tokens', '?')} new tokens at most "
                   "(the MiniLLM protocol; scores x100).\n\n" + results_table(scores) + "\n")
        eval_results = _eval_results(scores, settings) or None

    card_data = ModelCardData(base_model=base, library_name="transformers", tags=tags, datasets=datasets or None,
                              pipeline_tag="text-generation", eval_results=eval_results,
                              model_name=name if eval_results else None)
    commit = run.get("_git_commit")
    body = "\n".join([
        f"# {name}", "",
        f"A causal language model trained with prefkd (`prefkd {kind}`). It loads with "
        "`AutoModelForCausalLM.from_pretrained`.", "",
        "## Method", "", method_line, "",
        "## Models", "",
        f"- Student: {started}.",
        f"- Teacher: `{teacher}`" + (f" ({how})." if how and teacher != "(none)" else "."), "",
        "## Training settings", "", _table(settings_rows), "",
        "## Training data", "",
        *(f"- {what}: `{src}`" for what, src in sources), "",
        *([f"prefkd commit `{commit}`; the full settings are in the run's config.yaml.", ""] if commit else []),
    ]) + results
    return ModelCard.from_template(card_data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}\n", body=body)


def read_evaluation(eval_dir: str | Path) -> tuple[dict, dict]:
    """scores.json and settings.json of an evaluation directory (`prefkd evaluate`'s output)."""
    d = Path(eval_dir)
    if not (d / "scores.json").is_file():
        raise PrefkdError(f"{d}/scores.json not found: pass the output directory of `prefkd evaluate` (--eval)")
    settings = json.loads((d / "settings.json").read_text(encoding="utf-8")) if (d / "settings.json").is_file() \
        else {}
    return json.loads((d / "scores.json").read_text(encoding="utf-8")), settings


def read_run_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise PrefkdError(f"{path} not found: pass the output directory of `prefkd sft` or `prefkd distill`")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def write_card(run_dir: str | Path, run: dict | None = None, eval_dir: str | Path | None = None,
               name: str = "") -> Path:
    """Write RUN_DIR/model/README.md (atomically) from the run's config (default: its config.yaml) and, when given,
    an evaluation directory's scores."""
    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    if not model_dir.is_dir():
        raise PrefkdError(f"{model_dir} not found: the run has not saved a model yet (finish or resume it first)")
    run = dict(run) if run is not None else read_run_config(run_dir)
    if "_git_commit" not in run and (run_dir / "config.yaml").is_file():
        run["_git_commit"] = read_run_config(run_dir).get("_git_commit")
    scores, settings = read_evaluation(eval_dir) if eval_dir is not None else (None, None)
    card = model_card(run, scores, settings, name or run.get("push_to_hub") or run_dir.name)
    path = model_dir / CARD
    atomic.write_text(path, str(card))
    return path


def push(model_dir: str | Path, repo_id: str, hub: HubConfig, run_dir: str | Path) -> str:
    """Upload the model directory (student + card) to `repo_id`; any Hub or network failure becomes one line that
    says the model is safe locally and how to push it later. Returns the repo's URL."""
    from huggingface_hub import HfApi

    check_push(repo_id, hub)
    token = os.environ.get(hub.token) or None  # unset: huggingface_hub's saved login, if any
    api = HfApi()
    try:
        url = api.create_repo(repo_id, token=token, private=hub.private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(model_dir), token=token, repo_type="model",
                          commit_message="prefkd: upload the student and its model card")
    except _hub_errors() as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise PrefkdError(f"could not push to the Hub repo {repo_id} ({type(e).__name__}: {reason}); the model is "
                          f"saved in {model_dir}. Check the network, unset HF_HUB_OFFLINE, set ${hub.token} to a "
                          f"write token, then run `prefkd card {run_dir} --push {repo_id}`") from None
    return str(url)


def _hub_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub's own errors (offline mode, HTTP status, missing login) are OSErrors; connection and timeout
    # errors come from its HTTP client. ValueError: a repo id the Hub refuses.
    errors: tuple[type[BaseException], ...] = (OSError, ValueError)
    try:
        import httpx2

        errors += (httpx2.HTTPError,)
    except ImportError:  # another huggingface_hub release with another client: its errors are OSErrors above
        pass
    return errors


def publish(out: str | Path, cfg: Any) -> None:
    """After a run has saved its model: the card, then the upload when `push_to_hub` is set. Main process only."""
    from prefkd import config
    from prefkd.distributed import process_state

    if not process_state().is_main_process:
        return
    write_card(out, config.to_dict(cfg))
    if getattr(cfg, "push_to_hub", ""):
        push(Path(out) / "model", cfg.push_to_hub, cfg.hub, out)
