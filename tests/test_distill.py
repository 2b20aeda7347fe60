"""The method interface: registry errors, config fields, and the RSD module's size and loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import distill, losses
from jaxkd.distill import rsd
from jaxkd.errors import ConfigError

from helpers import apply_method, init_method

CTX = distill.MethodContext(num_devices=8, label_smoothing=0.1)


def _spec(name, dim):
    return distill.ModelSpec(name=name, num_classes=100, embed_dim=dim, stage_shapes=(),
                             token_stages=False)


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(ConfigError, match="unknown method 'rds'.*ce, .*kd, .*rsd"):
        distill.method_config("rds")


def test_misspelt_method_field_is_refused():
    with pytest.raises(ConfigError, match="no config field.*kapa.*kappa"):
        distill.method_config("rsd", kapa=0.1)
    config = distill.method_config("rsd")
    config.lambda_ = 1.0  # a field a config file might add by mistake
    with pytest.raises(ConfigError, match="lambda_"):
        distill.create_method(config, _spec("s", 8), _spec("t", 8), CTX)


def test_distilling_method_without_teacher_is_refused():
    with pytest.raises(ConfigError, match="needs|teacher"):
        distill.create_method(distill.method_config("kd"), _spec("s", 8), None, CTX)


@pytest.mark.parametrize("student_dim,teacher_dim,expansion,expected", [
    (512, 768, 2.0, 1_312_768),  # Swin-T -> ResNet18 on CIFAR (REFERENCE.md: 1.31M)
    (512, 768, 4.0, 2_625_536),  # ImageNet, g = 4 (2.63M)
])
def test_aad_parameter_count_matches_the_paper(student_dim, teacher_dim, expansion, expected):
    method = distill.create_method(distill.method_config("rsd", expansion=expansion),
                                   _spec("s", student_dim), _spec("t", teacher_dim), CTX)
    out_s = (jnp.zeros((16, 100)), {"embedding": jnp.zeros((16, student_dim))})
    out_t = (jnp.zeros((16, 100)), {"embedding": jnp.zeros((16, teacher_dim))})
    batch = {"label": jnp.zeros((16,), jnp.int32)}
    shapes = jax.eval_shape(lambda: init_method(method, jax.random.PRNGKey(0), out_s, out_t,
                                                batch, train=False))
    count = sum(int(np.prod(x.shape)) for c in ("params", "batch_stats")
                for x in jax.tree.leaves(shapes[c]))
    # BN running statistics are buffers, not trainable: the paper counts weights + BN affine.
    trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
    assert trainable == expected
    assert count == expected + 2 * int(expansion * student_dim)


def test_rsd_method_combines_ce_and_grouped_rsd():
    rng = np.random.RandomState(0)
    method = distill.create_method(distill.method_config("rsd", rsd_weight=0.5),
                                   _spec("s", 6), _spec("t", 5), CTX)
    s_logits, t_logits = rng.randn(16, 10), rng.randn(16, 10)
    out_s = (jnp.asarray(s_logits, jnp.float32), {"embedding": jnp.asarray(rng.randn(16, 6),
                                                                           jnp.float32)})
    out_t = (jnp.asarray(t_logits, jnp.float32), {"embedding": jnp.asarray(rng.randn(16, 5),
                                                                           jnp.float32)})
    labels = jnp.arange(16) % 10
    variables = init_method(method, jax.random.PRNGKey(0), out_s, out_t, {"label": labels},
                            train=False)
    (loss, metrics), _ = apply_method(method, variables, out_s, out_t, {"label": labels},
                                      train=True, mutable=["batch_stats"])
    projected, _ = rsd.AAD(method.hidden_dim, 5).apply(
        {"params": variables["params"]["aad"], "batch_stats": variables["batch_stats"]["aad"]},
        out_s[1]["embedding"], train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(
        metrics["rsd"], losses.rsd_loss_grouped(projected, out_t[1]["embedding"], 8), rtol=1e-6)
    ce = losses.cross_entropy(out_s[0], labels, label_smoothing=0.1)
    np.testing.assert_allclose(metrics["ce"], ce, rtol=1e-6)
    np.testing.assert_allclose(loss, ce + 0.5 * metrics["rsd"], rtol=1e-6)
    assert method.num_groups == 8  # per device by default (stats_groups 0)
