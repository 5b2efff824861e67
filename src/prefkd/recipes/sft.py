"""`prefkd sft`: supervised fine-tuning on references, or LM pretraining on a corpus (a model built from scratch)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from prefkd import config, trackers
from prefkd.cache import model_identity
from prefkd.cards import HubConfig, check_push, publish
from prefkd.config import opt, section
from prefkd.console import console
from prefkd.data.chat import check_assistant_turns, renderer_for
from prefkd.data.collate import Example
from prefkd.data.corpus import token_blocks
from prefkd.data.loaders import load_instructions
from prefkd.data.records import Instruction
from prefkd.generation import SamplingConfig
from prefkd.lora import LoRAConfig, apply_lora, save_trained
from prefkd.methods import MethodConfig, get_method
from prefkd.methods.data import reference_examples
from prefkd.models import ModelConfig, load_tokenizer, model_from_config, n_params
from prefkd.recipes.common import DataConfig, begin_run, check_run, need, read_corpus, resolve_train
from prefkd.train import RunData, TrainConfig, train


@dataclass
class SFTRun:
    out: str = opt("runs/sft", "output directory")
    model: ModelConfig = section(ModelConfig)
    tokenizer: str = opt("", "tokenizer path or hub id; default: the model's")
    data: DataConfig = section(DataConfig)
    train: TrainConfig = section(TrainConfig)
    lora: LoRAConfig = section(LoRAConfig, "LoRA adapters via peft (lora.r 0 = train all weights)")
    assistant_turns: str = opt("all", "conversations: train on every assistant turn (all) or the last one (last)")
    block_size: int = opt(256, "pretraining (data.corpus without data.train): tokens per corpus block")
    # Where the model is uploaded, not how it is trained: a finished run may be resumed to push it.
    push_to_hub: str = opt("", "Hub repo id (user/name): upload OUT/model with its model card after training",
                           keyed=False)
    hub: HubConfig = section(HubConfig, keyed=False)


def run_sft(cfg: SFTRun, records: list[Instruction] | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
            name: str = "sft", corpus: list[str] | None = None, existing: str = "auto") -> list[dict]:
    """SFT on reference responses; with a corpus instead (`data.corpus`, no `data.train`), LM pretraining on its
    token blocks (every token scored). `existing`: what to do with a run already in `cfg.out` (rundir.py); "auto"
    resumes the same settings."""
    # Set-up: claim the output before any work.
    out = Path(cfg.out)
    check_push(cfg.push_to_hub, cfg.hub)
    check_assistant_turns(cfg.assistant_turns)
    trackers.check_installed(cfg.train.report_to)
    clear = check_run(out, cfg, existing)
    # Data and model.
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer or cfg.model.path)
    if corpus is None and not records and cfg.data.corpus and not cfg.data.train:
        corpus = read_corpus(cfg.data.corpus)
    model = model_from_config(cfg.model, tokenizer, cfg.train.seed)
    train_cfg, resolved = resolve_train(out, cfg.train, [model], clear)
    what = f"{cfg.model.path or f'{cfg.model.arch}-{cfg.model.size}'}, {n_params(model) / 1e6:.2f}M parameters"
    if corpus is not None:
        examples = [Example([], block) for block in token_blocks(tokenizer, corpus, cfg.block_size).tolist()]
        console.print(f"[bold]{name}[/]: {what}, pretraining on {len(examples)} blocks of {cfg.block_size} tokens")
        stage = "pretraining"
    else:
        records = records or load_instructions(need(cfg.data.train, "data.train"))
        console.print(f"[bold]{name}[/]: {what}, SFT on {len(records)} records")
        examples = reference_examples(renderer_for(tokenizer, cfg.data.template), records, train_cfg,
                                      cfg.data.train or name, all_turns=cfg.assistant_turns == "all")
        stage = "SFT"
    # Loop and save.
    begin_run(out, cfg, clear, resolved)
    logs = train(get_method("sft"), apply_lora(model, cfg.lora), tokenizer, RunData(examples), train_cfg,
                 MethodConfig(), SamplingConfig(), out, name=f"{name} {stage}",
                 save=lambda m, tok, path: save_trained(m, tok, path, cfg.lora), strict_resume=existing == "resume",
                 identity=model_identity(cfg.model.path) if cfg.model.path else None,
                 run_config=config.to_dict(replace(cfg, train=train_cfg)))
    publish(out, cfg)  # the model card (README.md) beside the saved model, then the upload if asked
    return logs
