"""Pure loss functions: they know nothing about models or data."""

from prefkd.losses.distillm2 import (
    distillm2_adaptive_alpha,
    distillm2_loss,
    distillm2_weights,
)
from prefkd.losses.divergences import (
    adaptive_kl,
    dpkd_token_loss,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from prefkd.losses.preference import (
    cpo_loss,
    dpkd_loo_loss,
    dpkd_loss,
    dpo_loss,
    implicit_reward,
    ipo_loss,
    plad_margin_loss,
    plad_rank_loss,
    simpo_loss,
)
from prefkd.losses.uld import (
    byte_span_groups,
    merged_group_probs,
    skip_last_position,
    sorted_l1,
    uld_byte_aligned_loss,
    uld_distance,
    uld_loss,
    uld_positional_loss,
)

__all__ = [
    "adaptive_kl",
    "byte_span_groups",
    "cpo_loss",
    "distillm2_adaptive_alpha",
    "distillm2_loss",
    "distillm2_weights",
    "dpkd_loo_loss",
    "dpkd_loss",
    "dpkd_token_loss",
    "dpo_loss",
    "forward_kl",
    "generalized_jsd",
    "implicit_reward",
    "ipo_loss",
    "merged_group_probs",
    "plad_margin_loss",
    "plad_rank_loss",
    "reverse_kl",
    "simpo_loss",
    "skip_last_position",
    "skew_forward_kl",
    "skew_reverse_kl",
    "sorted_l1",
    "total_variation",
    "uld_byte_aligned_loss",
    "uld_distance",
    "uld_loss",
    "uld_positional_loss",
]
