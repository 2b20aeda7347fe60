"""Distillation and classification losses: pure functions returning float32 scalars."""

from jaxkd.losses.coss import coss_loss
from jaxkd.losses.cross_entropy import cross_entropy, soft_target_cross_entropy, to_class_labels
from jaxkd.losses.dist import dist_loss
from jaxkd.losses.dkd import dkd_loss
from jaxkd.losses.feature import mse_loss
from jaxkd.losses.hcl import hcl_loss
from jaxkd.losses.kd import kd_loss
from jaxkd.losses.ofa import ofa_loss
from jaxkd.losses.rsd import rsd_loss, rsd_loss_grouped

__all__ = [
    "coss_loss",
    "cross_entropy",
    "dist_loss",
    "dkd_loss",
    "hcl_loss",
    "kd_loss",
    "mse_loss",
    "ofa_loss",
    "rsd_loss",
    "rsd_loss_grouped",
    "soft_target_cross_entropy",
    "to_class_labels",
]
