"""`prefkd generate`: one sampled response per prompt into a keyed, resumable jsonl cache (SeqKD and PLaD consume
these)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefkd import rundir
from prefkd.cache import cache_key, generate_cached, model_identity, read_cache
from prefkd.config import opt, section
from prefkd.data.chat import TEMPLATE_HELP, renderer_for
from prefkd.data.loaders import load_instructions
from prefkd.errors import ConfigError, PrefkdError
from prefkd.generation import SamplingConfig
from prefkd.methods.data import backend
from prefkd.models import load_model, load_tokenizer
from prefkd.recipes.common import need
from prefkd.teacher_client import ServerConfig, TeacherServer
from prefkd.vllm_backend import VLLMConfig, VLLMSampler


@dataclass
class GenerateRun:
    model: str = opt("", "model path or hub id")
    data: str = opt("", "records whose prompts are sampled (any format `prefkd.data.load_instructions` reads)")
    out: str = opt("", "jsonl cache file; a rerun with the same settings reuses it, an interrupted one resumes")
    template: str = opt("auto", TEMPLATE_HELP)
    seed: int = opt(0, "sampling seed (each batch is seeded from it and its first index)")
    overwrite: bool = opt(False, "replace a cache file written with other settings")
    sampling: SamplingConfig = section(SamplingConfig)
    vllm: VLLMConfig = section(VLLMConfig, "sample with vLLM on GPUs instead of transformers")
    server: ServerConfig = section(ServerConfig, "sample through a completions server (server.url, `vllm serve` "
                                                 "or `prefkd serve`) instead of loading model")


def run_generate(cfg: GenerateRun, existing: str = "auto") -> list[dict]:
    """`existing` (see rundir.py) says what to do with a file already at `out`: the CLI refuses unless told."""
    if cfg.server.url:
        return _generate_on_server(cfg, existing)
    model_path, out = need(cfg.model, "model"), need(cfg.out, "out")
    records = load_instructions(need(cfg.data, "data"), require_references=False)
    sampler = VLLMSampler(model_path, cfg.vllm) if cfg.vllm.enabled else None  # fails at once without vllm
    renderer = renderer_for(load_tokenizer(model_path), cfg.template)
    key = cache_key(model_identity(model_path), [renderer.prompt(r) for r in records], cfg.sampling, cfg.seed,
                    backend(cfg.vllm))
    _check_out(Path(out), key, existing)
    return generate_cached(None if sampler else load_model(model_path), renderer, records,
                           cfg.sampling, out, key, cfg.seed, overwrite=cfg.overwrite, sampler=sampler)


def _generate_on_server(cfg: GenerateRun, existing: str) -> list[dict]:
    """The samples drawn by the server at server.url, in its model's tokens and chat template."""
    if cfg.model or cfg.vllm.enabled:
        raise ConfigError("server.url samples on the server: leave model and vllm.enabled unset")
    out = need(cfg.out, "out")
    records = load_instructions(need(cfg.data, "data"), require_references=False)
    server = TeacherServer(cfg.server)
    try:
        renderer = renderer_for(server.tokenizer, cfg.template)
        key = cache_key(server.identity, [renderer.prompt(r) for r in records], cfg.sampling, cfg.seed, "server")
        _check_out(Path(out), key, existing)
        return generate_cached(server, renderer, records, cfg.sampling, out, key, cfg.seed, overwrite=cfg.overwrite,
                               sampler=server.sample)
    finally:
        server.close()


def _check_out(out: Path, key: str, existing: str) -> None:
    if existing == "refuse" and out.exists():
        raise rundir.RunDirError(f"{out} already holds {_describe_cache(out, key)}; pass --resume to complete "
                                 f"or reuse it, or --overwrite to sample it afresh")
    if existing == "overwrite":
        rundir.remove(out)  # even a readable cache of these settings: --overwrite samples afresh


def _describe_cache(path: Path, key: str) -> str:
    try:
        header, rows = read_cache(path)
    except PrefkdError as e:
        return f"a file that is not a readable sample cache ({e})"
    if header.get("cache_key") != key:
        return "samples of other settings (model, prompts, sampling or seed)"
    return f"{len(rows)} of {header['n']} samples of these settings"
