"""Distillation and classification losses: pure functions returning float32 scalars."""

from jaxkd.losses._common import mean_over_groups, pool_to_smaller
from jaxkd.losses.coss import coss_loss, space_similarity_loss
from jaxkd.losses.cross_entropy import cross_entropy, soft_target_cross_entropy, to_class_labels
from jaxkd.losses.dist import dist_loss
from jaxkd.losses.dkd import dkd_loss
from jaxkd.losses.feature import mse_loss
from jaxkd.losses.hcl import hcl_loss
from jaxkd.losses.kd import kd_loss
from jaxkd.losses.maps import at_loss, factor_transfer_loss, nst_loss, vid_loss
from jaxkd.losses.ofa import ofa_loss
from jaxkd.losses.relational import (cc_loss, pkt_loss, rkd_angle_loss, rkd_distance_loss,
                                     rkd_loss, sp_loss)
from jaxkd.losses.rsd import rsd_loss, rsd_loss_grouped
from jaxkd.losses.seed import seed_loss

__all__ = [
    "at_loss",
    "cc_loss",
    "coss_loss",
    "cross_entropy",
    "dist_loss",
    "dkd_loss",
    "factor_transfer_loss",
    "hcl_loss",
    "kd_loss",
    "mean_over_groups",
    "mse_loss",
    "nst_loss",
    "ofa_loss",
    "pkt_loss",
    "pool_to_smaller",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "rkd_loss",
    "rsd_loss",
    "rsd_loss_grouped",
    "seed_loss",
    "soft_target_cross_entropy",
    "space_similarity_loss",
    "sp_loss",
    "to_class_labels",
    "vid_loss",
]
