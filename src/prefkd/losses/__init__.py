"""Pure loss functions: they know nothing about models or data."""

from prefkd.losses.preference import dpkd_loss

__all__ = ["dpkd_loss"]
