"""Optional vLLM backend for sampling cached responses (teacher samples, PLaD pairs) on GPUs.

vllm is imported only when `vllm.enabled=true`, so CPU installs never need it; asking for it without it installed
is a one-line error. The sampler keeps the cache's contract (`cache.Sampler`): one response per prompt, ending with
EOS unless it hit `max_new_tokens`; prompt i of a batch is seeded with the batch seed + i, so a resumed cache draws
what an uninterrupted one would have (vLLM's per-request seeds do not depend on what else is in the batch).
Samples differ from transformers' for the same seed, so the cache key records the backend.

Sampling inside the training loop (dpkd's fresh samples, on-policy methods) stays on transformers: the student
changes every step. For a large teacher, sample its responses once here (`distill.dpkd.teacher_samples=cached`).
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import torch

from prefkd.config import opt
from prefkd.errors import ConfigError, PrefkdError
from prefkd.generation import SamplingConfig

INSTALL = "pip install 'prefkd[vllm]' (vllm needs a CUDA GPU)"


@dataclass
class VLLMConfig:
    enabled: bool = opt(False, f"sample cached responses with vLLM on GPUs ({INSTALL}); false = transformers")
    tensor_parallel_size: int = opt(1, "GPUs one model is split over")
    gpu_memory_utilization: float = opt(0.9, "share of each GPU's memory vLLM may take")
    dtype: str = opt("auto", "weights dtype in vLLM: auto (the checkpoint's), bfloat16, float16")
    max_model_len: int = opt(0, "context length vLLM reserves for; 0 = the model's")


def require_vllm() -> ModuleType:
    try:
        return importlib.import_module("vllm")
    except ImportError:
        raise PrefkdError(f"vllm.enabled=true needs the vllm package, which is not installed: {INSTALL}; or set "
                          f"vllm.enabled=false to sample with transformers") from None


def sampling_params(cfg: SamplingConfig, seed: int, eos_id: int | Sequence[int]) -> dict:
    """Our sampling settings as vLLM `SamplingParams` keyword arguments (top_k 0 and -1 both mean off)."""
    if cfg.no_repeat_ngram_size:
        raise ConfigError("sampling.no_repeat_ngram_size has no vLLM equivalent; set it to 0 or vllm.enabled=false")
    greedy = cfg.temperature <= 0
    return {"n": 1, "temperature": 0.0 if greedy else cfg.temperature, "top_p": 1.0 if greedy else cfg.top_p,
            "top_k": -1 if greedy or cfg.top_k <= 0 else cfg.top_k, "max_tokens": cfg.max_new_tokens, "seed": seed,
            "stop_token_ids": _ids(eos_id), "skip_special_tokens": True, "detokenize": False}


def response_ids(token_ids: list[int], finish_reason: str | None, eos_id: int | Sequence[int]) -> list[int]:
    """A completion as our responses are: the end token kept at the end when the model stopped (the first of the
    end tokens when vLLM left it out), none when cut by length."""
    ids, stops = list(token_ids), _ids(eos_id)
    at = next((i for i, t in enumerate(ids) if t in stops), None)
    if at is not None:
        return ids[: at + 1]
    return ids + stops[:1] if finish_reason == "stop" else ids


def _ids(eos_id: int | Sequence[int]) -> list[int]:
    return [eos_id] if isinstance(eos_id, int) else list(eos_id)


class VLLMSampler:
    """A `cache.Sampler` backed by one vLLM engine, started on first use (a cache that is complete starts none)."""

    def __init__(self, model_path: str, cfg: VLLMConfig, trust_remote_code: bool = False):
        self.model_path, self.cfg, self.trust_remote_code = model_path, cfg, trust_remote_code
        self.vllm = require_vllm()  # fail at once, not after the first batch
        self.llm = None

    def __call__(self, prompt_ids: list[list[int]], sampling: SamplingConfig, pad_id: int,
                 eos_id: int | Sequence[int],
                 seed: int | None = None) -> list[list[int]]:
        if self.llm is None:
            extra = {"max_model_len": self.cfg.max_model_len} if self.cfg.max_model_len else {}
            self.llm = self.vllm.LLM(model=self.model_path, tokenizer=self.model_path, dtype=self.cfg.dtype,
                                     tensor_parallel_size=self.cfg.tensor_parallel_size,
                                     gpu_memory_utilization=self.cfg.gpu_memory_utilization,
                                     trust_remote_code=self.trust_remote_code, **extra)
        room = self.llm.llm_engine.model_config.max_model_len - sampling.max_new_tokens
        if room <= 0:
            raise ConfigError(f"sampling.max_new_tokens={sampling.max_new_tokens} leaves no room for a prompt")
        prompts = [{"prompt_token_ids": p[-room:]} for p in prompt_ids]  # cut from the left, as generation.py does
        params = [self.vllm.SamplingParams(**sampling_params(sampling, (seed or 0) + i, eos_id))
                  for i in range(len(prompt_ids))]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [response_ids(o.outputs[0].token_ids, o.outputs[0].finish_reason, eos_id) for o in outputs]

    def close(self) -> None:
        """Give the GPU memory back before training starts in the same process."""
        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
