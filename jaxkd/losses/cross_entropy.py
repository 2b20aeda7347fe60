"""Classification cross-entropies with timm's conventions (hard labels and mixup soft targets)."""

import jax
import jax.numpy as jnp

from jaxkd.losses._common import as_float32, check_ndim


def to_class_labels(labels):
    """Integer class labels [B] from integer labels [B] or soft (mixup/cutmix) labels [B, C].

    The class of a soft label is its argmax, as the official OFA/RSD code does.
    """
    labels = jnp.asarray(labels)
    if labels.ndim == 1:
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f"to_class_labels: 1-D labels must be integers, got {labels.dtype}")
        return labels.astype(jnp.int32)
    if labels.ndim == 2:
        return jnp.argmax(labels, axis=-1).astype(jnp.int32)
    raise ValueError(f"to_class_labels: labels must be [B] or [B, C], got shape {labels.shape}")


def checked_class_labels(name, labels, batch, num_classes):
    """to_class_labels, raising a ValueError (naming the loss) when labels do not fit the logits."""
    if jnp.ndim(labels) == 2 and jnp.shape(labels) != (batch, num_classes):
        raise ValueError(f"{name}: soft labels shape {jnp.shape(labels)} != logits shape "
                         f"{(batch, num_classes)}")
    labels = to_class_labels(labels)
    if labels.shape != (batch,):
        raise ValueError(f"{name}: labels give shape {labels.shape}, expected ({batch},)")
    return labels


def _check_labels(name, logits, labels):
    check_ndim(name, logits, 2, "logits [B, C]")
    if jnp.ndim(labels) != 1 or jnp.shape(labels)[0] != jnp.shape(logits)[0]:
        raise ValueError(f"{name}: labels must be integer [B] = [{jnp.shape(logits)[0]}], got "
                         f"shape {jnp.shape(labels)} (soft [B, C] labels: use "
                         "soft_target_cross_entropy or to_class_labels)")
    if not jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
        raise ValueError(f"{name}: labels must be integers, got {jnp.asarray(labels).dtype}")


def cross_entropy(logits, labels, label_smoothing=0.0):
    """Batch-mean CE on integer labels [B] with timm's LabelSmoothingCrossEntropy convention.

    The target distribution is (1 - s) on the label plus s / C on every class (the label
    included), i.e. (1 - s) * NLL + s * mean_c(-log p_c).
    """
    _check_labels("cross_entropy", logits, labels)
    log_probs = jax.nn.log_softmax(as_float32(logits), axis=-1)
    labels = jnp.asarray(labels).astype(jnp.int32)
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    smooth = -jnp.mean(log_probs, axis=-1)
    return jnp.mean((1.0 - label_smoothing) * nll + label_smoothing * smooth)


def soft_target_cross_entropy(logits, targets):
    """Batch-mean CE against soft targets [B, C] (timm's SoftTargetCrossEntropy, for mixup)."""
    check_ndim("soft_target_cross_entropy", logits, 2, "logits [B, C]")
    if jnp.shape(targets) != jnp.shape(logits):
        raise ValueError(f"soft_target_cross_entropy: targets shape {jnp.shape(targets)} != "
                         f"logits shape {jnp.shape(logits)}")
    log_probs = jax.nn.log_softmax(as_float32(logits), axis=-1)
    targets = jax.lax.stop_gradient(as_float32(targets))
    return jnp.mean(-jnp.sum(targets * log_probs, axis=-1))
