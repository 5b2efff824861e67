"""`distill.*`: the settings every method shares (the loss mix, replay, LM loss) and one section per method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from prefkd.config import opt, section
from prefkd.errors import ConfigError
from prefkd.methods.distillm2 import DistiLLM2Config
from prefkd.methods.dpkd import DPKDConfig
from prefkd.methods.on_policy import GKDConfig, RKLConfig
from prefkd.methods.plad import PLaDConfig
from prefkd.methods.preference import CPOConfig, DPOConfig, IPOConfig, SimPOConfig
from prefkd.methods.token_kd import AKLConfig, KDConfig, SkewConfig
from prefkd.methods.uld import ULDConfig


@dataclass
class MethodConfig:
    # Keys of saved configs from before each preference form had its own section.
    ALIASES: ClassVar[dict[str, str]] = {
        "pref.dpo_beta": "dpo.beta", "pref.ipo_beta": "ipo.beta", "pref.cpo_beta": "cpo.beta",
        "pref.cpo_nll_weight": "cpo.nll_weight", "pref.simpo_beta": "simpo.beta", "pref.simpo_gamma": "simpo.gamma",
    }

    kappa: float = opt(0.5, "L = (1-kappa) CE(anchor) + kappa L_method; anchor = y_t or the reference; 1 = paper form")
    replay: float = opt(0.5, "share of each batch drawn from labelled references (CE); 0 = paper form")
    lm_weight: float = opt(0.1, "lambda: weight of the LM loss on the pretraining corpus (0 = ablation w/o LM loss)")
    lm_block_size: int = opt(128, "tokens per pretraining-corpus block")
    responses: str = opt("auto", "'sequences' methods: 'auto' = references where prompts have them, else "
                                 "cached teacher samples; 'teacher' = always teacher samples")
    cache_dir: str = opt("", "where sample caches live (shared between runs; keyed by model, data, sampling); "
                             "default OUT/cache")
    kd: KDConfig = section(KDConfig)
    gkd: GKDConfig = section(GKDConfig)
    rkl: RKLConfig = section(RKLConfig)
    akl: AKLConfig = section(AKLConfig)
    skew: SkewConfig = section(SkewConfig)
    dpkd: DPKDConfig = section(DPKDConfig)
    dpo: DPOConfig = section(DPOConfig)
    ipo: IPOConfig = section(IPOConfig)
    cpo: CPOConfig = section(CPOConfig)
    simpo: SimPOConfig = section(SimPOConfig)
    plad: PLaDConfig = section(PLaDConfig)
    distillm2: DistiLLM2Config = section(DistiLLM2Config)
    uld: ULDConfig = section(ULDConfig)

    def __post_init__(self) -> None:
        if self.responses not in ("auto", "teacher"):
            raise ConfigError(f"distill.responses must be auto or teacher, not '{self.responses}'")
