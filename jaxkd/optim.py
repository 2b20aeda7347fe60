"""Optimisers and learning-rate schedules of the paper recipes, built from a ConfigDict."""

from __future__ import annotations

import jax
import optax

from jaxkd.errors import ConfigError


def learning_rate_schedule(config, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    """Linear warmup from 0, then cosine to `end_lr` or step decay at `decay_epochs`."""
    warmup = min(int(round(config.get("warmup_epochs", 0) * steps_per_epoch)), total_steps)
    lr = config.lr
    if config.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1),
                                           alpha=config.get("end_lr", 0.0) / lr)
    elif config.schedule == "step":
        boundaries = {int(e * steps_per_epoch) - warmup: config.get("decay_factor", 0.1)
                      for e in config.decay_epochs}
        main = optax.piecewise_constant_schedule(lr, boundaries)
    elif config.schedule == "constant":
        main = optax.constant_schedule(lr)
    else:
        raise ConfigError(f"unknown schedule {config.schedule!r}; use cosine, step or constant")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _decay_mask(params):
    """timm's convention: no weight decay on biases and normalisation parameters (ndim <= 1)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def build_optimizer(config, total_steps: int, steps_per_epoch: int):
    """Returns (optax transformation, schedule)."""
    schedule = learning_rate_schedule(config, total_steps, steps_per_epoch)
    wd = config.get("weight_decay", 0.0)
    if config.name == "sgd":
        tx = optax.chain(optax.add_decayed_weights(wd, mask=_decay_mask),
                         optax.sgd(schedule, momentum=config.get("momentum", 0.9),
                                   nesterov=config.get("nesterov", False)))
    elif config.name == "adamw":
        tx = optax.adamw(schedule, b1=config.get("b1", 0.9), b2=config.get("b2", 0.999),
                         eps=config.get("eps", 1e-8), weight_decay=wd, mask=_decay_mask)
    else:
        raise ConfigError(f"unknown optimizer {config.name!r}; use sgd or adamw")
    clip = config.get("clip_norm", 0.0)
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    return tx, schedule
