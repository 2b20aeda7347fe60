"""Linear CKA: invariances of Kornblith et al. 2019 and a float64 feature-space reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.analysis import linear_cka

N, D_X, D_Y = 48, 12, 20


def ref_linear_cka(x, y):
    """Feature-space form ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F) in float64."""
    x = x.reshape(len(x), -1).astype(np.float64)
    y = y.reshape(len(y), -1).astype(np.float64)
    x, y = x - x.mean(0), y - y.mean(0)
    return (np.linalg.norm(y.T @ x) ** 2 /
            (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def random_orthogonal(rng, dim):
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


@pytest.fixture
def features():
    """Related but different feature sets, so CKA sits well inside (0, 1)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D_X))
    y = np.concatenate([x @ rng.normal(size=(D_X, D_X)), rng.normal(size=(N, D_Y - D_X))], 1)
    return x.astype(np.float32), y.astype(np.float32), rng


class CkaVariants(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_float64_reference(self):
        rng = np.random.default_rng(1)
        x = rng.normal(size=(N, 4, 4, 3)).astype(np.float32)
        y = (x.reshape(N, -1)[:, :10] + rng.normal(size=(N, 10))).astype(np.float32)
        value = self.variant(linear_cka)(x, y)
        chex.assert_shape(value, ())
        chex.assert_type(value, jnp.float32)
        reference = ref_linear_cka(x, y)
        assert 0.05 < reference < 0.95
        chex.assert_trees_all_close(value, np.float32(reference), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_identity_is_one(self):
        x = np.random.default_rng(2).normal(size=(N, D_X)).astype(np.float32)
        chex.assert_trees_all_close(self.variant(linear_cka)(x, x), np.float32(1.0), rtol=1e-6)


def test_invariant_to_orthogonal_maps_and_isotropic_scaling(features):
    x, y, rng = features
    base = linear_cka(x, y)
    x_rotated = x @ random_orthogonal(rng, D_X).astype(np.float32)
    y_rotated = y @ random_orthogonal(rng, D_Y).astype(np.float32)
    for x_map, y_map in ((x_rotated, y), (x, y_rotated), (x_rotated, y_rotated),
                         (3.7 * x, y), (x, 1e-3 * y), (2.5 * x_rotated, 40.0 * y_rotated)):
        chex.assert_trees_all_close(linear_cka(x_map, y_map), base, rtol=1e-5)


def test_symmetric(features):
    x, y, _ = features
    chex.assert_trees_all_close(linear_cka(x, y), linear_cka(y, x), rtol=1e-6)


def test_not_invariant_to_a_general_invertible_map(features):
    x, y, rng = features
    invertible = random_orthogonal(rng, D_X) @ np.diag(np.geomspace(0.05, 20.0, D_X))
    assert np.linalg.cond(invertible) < 1e4
    changed = linear_cka(x @ invertible.astype(np.float32), y)
    chex.assert_trees_all_close(changed, np.float32(ref_linear_cka(x @ invertible, y)), rtol=1e-4)
    assert abs(float(changed) - float(linear_cka(x, y))) > 0.05


def test_float64_under_x64():
    x = np.random.default_rng(3).normal(size=(N, D_X))
    y = np.tanh(x @ np.random.default_rng(4).normal(size=(D_X, D_Y)))
    with jax.enable_x64(True):
        value = linear_cka(jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64))
        chex.assert_type(value, jnp.float64)
        np.testing.assert_allclose(float(value), ref_linear_cka(x, y), rtol=1e-12)


def test_bfloat16_and_large_magnitudes_stay_float32_and_finite(features):
    x, y, _ = features
    value = linear_cka(jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16))
    chex.assert_type(value, jnp.float32)
    x16 = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    y16 = np.asarray(jnp.asarray(y, jnp.bfloat16).astype(jnp.float32))
    chex.assert_trees_all_close(value, np.float32(ref_linear_cka(x16, y16)), rtol=1e-5)
    # At 1e10 the unnormalised float32 HSIC products (~1e45) overflow to inf / NaN.
    huge = linear_cka(1e10 * x, 1e10 * y)
    chex.assert_tree_all_finite(huge)
    chex.assert_trees_all_close(huge, np.float32(ref_linear_cka(x, y)), rtol=1e-5)


def test_mismatched_example_counts_raise(features):
    x, y, _ = features
    with pytest.raises(ValueError, match="examples"):
        linear_cka(x, y[:-1])
