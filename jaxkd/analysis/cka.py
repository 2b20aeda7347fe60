"""Linear centred kernel alignment (Kornblith et al. 2019) between two sets of features."""

import jax
import jax.numpy as jnp


def _centred_unit_gram(features):
    """Gram matrix of the batch-centred features, scaled to unit Frobenius norm of the features.

    CKA is invariant to isotropic scaling, so dividing by ||X_c||_F first keeps the Gram
    entries <= 1 and the HSIC products far from float32 overflow for large activations.
    """
    centred = features - jnp.mean(features, axis=0)
    centred = centred / jnp.linalg.norm(centred)
    return jnp.matmul(centred, centred.T, precision=jax.lax.Precision.HIGHEST)


def linear_cka(x, y):
    """Linear CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = X_c X_c^T, L = Y_c Y_c^T.

    x: [N, ...] and y: [N, ...] are flattened per example to [N, D_x], [N, D_y]; the kernel
    (N x N) form keeps memory independent of the feature size. Computes in float64 when x64
    is enabled and either input is float64, else in float32 (bf16 inputs included). Returns NaN
    when either feature set is constant over the examples (CKA is undefined there).
    """
    if jnp.shape(x)[0] != jnp.shape(y)[0]:
        raise ValueError(f"linear_cka: x has {jnp.shape(x)[0]} examples, y has "
                         f"{jnp.shape(y)[0]}")
    dtype = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
    x = jnp.reshape(jnp.asarray(x).astype(dtype), (jnp.shape(x)[0], -1))
    y = jnp.reshape(jnp.asarray(y).astype(dtype), (jnp.shape(y)[0], -1))
    gram_x, gram_y = _centred_unit_gram(x), _centred_unit_gram(y)
    return jnp.sum(gram_x * gram_y) / (jnp.linalg.norm(gram_x) * jnp.linalg.norm(gram_y))
