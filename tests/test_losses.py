"""Losses against independent float64 references written from REFERENCE.md section 1."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as torch_f
from absl.testing import parameterized

from jaxkd import losses

from helpers import assert_float32_scalar_matches, assert_teacher_gets_no_gradient

BATCH, CLASSES, DIM = 16, 10, 12
RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------------------------
# float64 references


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def np_logsumexp(z):
    top = z.max()
    return top + np.log(np.exp(z - top).sum())


def np_kl_div_sum(log_q, p):
    """torch's F.kl_div(log_q, p, reduction='sum'): sum p * (log p - log_q), 0 where p == 0."""
    safe_p = np.where(p > 0, p, 1.0)
    return np.where(p > 0, p * (np.log(safe_p) - log_q), 0.0).sum()


def ref_cross_entropy(logits, labels, label_smoothing):
    classes = logits.shape[1]
    target = (1 - label_smoothing) * np.eye(classes)[labels] + label_smoothing / classes
    return -(target * np_log_softmax(logits)).sum(1).mean()


def ref_soft_target_cross_entropy(logits, targets):
    return -(targets * np_log_softmax(logits)).sum(1).mean()


def ref_kd(student, teacher, temperature):
    log_p_s = np_log_softmax(student / temperature)
    log_p_t = np_log_softmax(teacher / temperature)
    return temperature ** 2 * np_kl_div_sum(log_p_s, np.exp(log_p_t)) / len(student)


def ref_dkd_mdistiller(student, teacher, labels, alpha, beta, temperature):
    """mdistiller's dkd_loss, line by line (log of summed softmax, target masked by -1000)."""
    batch, classes = student.shape
    gt_mask = np.eye(classes)[labels]
    other_mask = 1.0 - gt_mask
    p_s = np_softmax(student / temperature)
    p_t = np_softmax(teacher / temperature)

    def cat_mask(p):
        return np.stack([(p * gt_mask).sum(1), (p * other_mask).sum(1)], axis=1)

    tckd = np_kl_div_sum(np.log(cat_mask(p_s)), cat_mask(p_t)) * temperature ** 2 / batch
    p_t_rest = np_softmax(teacher / temperature - 1000.0 * gt_mask)
    log_p_s_rest = np_log_softmax(student / temperature - 1000.0 * gt_mask)
    nckd = np_kl_div_sum(log_p_s_rest, p_t_rest) * temperature ** 2 / batch
    return alpha * tckd + beta * nckd


def ref_dkd_exact(student, teacher, labels, alpha, beta, temperature):
    """DKD with the target column deleted (valid where mdistiller's -1000 mask is not)."""
    def binary_log_probs(z, label):
        lse = np_logsumexp(z)
        return np.array([z[label] - lse, np_logsumexp(np.delete(z, label)) - lse])

    total = 0.0
    for z_s, z_t, label in zip(student / temperature, teacher / temperature, labels):
        b_s, b_t = binary_log_probs(z_s, label), binary_log_probs(z_t, label)
        q_s = np_log_softmax(np.delete(z_s, label))
        q_t = np_log_softmax(np.delete(z_t, label))
        total += alpha * np_kl_div_sum(b_s, np.exp(b_t)) + beta * np_kl_div_sum(q_s, np.exp(q_t))
    return temperature ** 2 * total / len(student)


def ref_pearson_rows(a, b):
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-8)


def ref_dist(student, teacher, beta, gamma, temperature):
    y_s, y_t = np_softmax(student / temperature), np_softmax(teacher / temperature)
    inter = 1 - ref_pearson_rows(y_s, y_t).mean()
    intra = 1 - ref_pearson_rows(y_s.T, y_t.T).mean()
    return temperature ** 2 * (beta * inter + gamma * intra)


def ref_ofa(student, teacher, labels, eps, temperature):
    class_labels = labels if labels.ndim == 1 else labels.argmax(1)
    mask = np.eye(student.shape[1])[class_labels]
    p_t = np_softmax(teacher / temperature)
    weights = (p_t + mask) ** eps - mask
    return -(weights * np_log_softmax(student / temperature)).sum(1).mean()


def ref_rsd(student, teacher, kappa, distance, normalize):
    def standardise(e):
        return (e - e.mean(0)) / (e.std(0) + 1e-5)

    def huber(x):
        return np.where(np.abs(x) <= 1, 0.5 * x ** 2, np.abs(x) - 0.5)

    if normalize:
        student, teacher = standardise(student), standardise(teacher)
    corr = teacher.T @ student / len(student)
    penalty = np.square if distance == "mse" else huber
    off_diagonal = corr[~np.eye(len(corr), dtype=bool)]
    return penalty(1 - np.diag(corr)).sum() + kappa * penalty(off_diagonal).sum()


def ref_rsd_grouped(student, teacher, num_groups, **kwargs):
    return np.mean([ref_rsd(s, t, **kwargs) for s, t in
                    zip(np.split(student, num_groups), np.split(teacher, num_groups))])


def ref_coss(student, teacher, lambda_ss, student_temp, teacher_temp):
    def normalise(x, axis):
        return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)

    co = (normalise(student, 1) / student_temp * normalise(teacher, 1) / teacher_temp).sum(1)
    ss = (normalise(student, 0) / student_temp * normalise(teacher, 0) / teacher_temp).sum(0)
    return -co.mean() - lambda_ss * ss.mean()


def ref_hcl(student, teacher):
    """PAT's hcl_loss in torch float64 on NCHW maps (torch's own adaptive pooling bins)."""
    if student.ndim == 3:
        return np.mean((student - teacher) ** 2)
    f_s = torch.from_numpy(student).permute(0, 3, 1, 2)
    f_t = torch.from_numpy(teacher).permute(0, 3, 1, 2)
    loss, weight, total = torch_f.mse_loss(f_s, f_t), 1.0, 1.0
    for size in (4, 2, 1):
        if size >= f_s.shape[2]:
            continue
        weight /= 2.0
        loss = loss + weight * torch_f.mse_loss(torch_f.adaptive_avg_pool2d(f_s, size),
                                                torch_f.adaptive_avg_pool2d(f_t, size))
        total += weight
    return (loss / total).item()


def ref_mse(student, teacher):
    return np.mean((student - teacher) ** 2)


# ----------------------------------------------------------------------------------------------
# cases: (jax loss, float64 reference, input maker, index of the teacher argument)


def logits_pair(rng, scale=3.0):
    return [rng.normal(size=(BATCH, CLASSES)) * scale, rng.normal(size=(BATCH, CLASSES)) * scale]


def int_labels(rng):
    return rng.integers(0, CLASSES, BATCH).astype(np.int32)


def soft_labels(rng):
    """Mixup-like soft labels: two smoothed one-hots mixed with a random weight per example."""
    eye = np.eye(CLASSES) * 0.9 + 0.1 / CLASSES
    lam = rng.uniform(0.2, 0.8, (BATCH, 1))
    return lam * eye[int_labels(rng)] + (1 - lam) * eye[int_labels(rng)]


def embeddings(rng, batch=BATCH, dim=DIM):
    shared = rng.normal(size=(batch, dim))
    return [shared + 0.5 * rng.normal(size=(batch, dim)),
            2.0 * shared + rng.normal(size=(batch, dim))]


def feature_maps(size):
    def make(rng):
        shape = (3, size, size, 5)
        return [rng.normal(size=shape), rng.normal(size=shape)]
    return make


def with_labels(make_labels, scale=3.0):
    return lambda rng: logits_pair(rng, scale) + [make_labels(rng)]


CASES = {
    "ce": (functools.partial(losses.cross_entropy, label_smoothing=0.0),
           functools.partial(ref_cross_entropy, label_smoothing=0.0),
           lambda rng: [logits_pair(rng)[0], int_labels(rng)], None),
    "ce_smoothing": (functools.partial(losses.cross_entropy, label_smoothing=0.1),
                     functools.partial(ref_cross_entropy, label_smoothing=0.1),
                     lambda rng: [logits_pair(rng)[0], int_labels(rng)], None),
    "soft_ce": (losses.soft_target_cross_entropy, ref_soft_target_cross_entropy,
                lambda rng: [logits_pair(rng)[0], soft_labels(rng)], None),
    "kd_t1": (losses.kd_loss, functools.partial(ref_kd, temperature=1.0), logits_pair, 1),
    "kd_t4": (functools.partial(losses.kd_loss, temperature=4.0),
              functools.partial(ref_kd, temperature=4.0), logits_pair, 1),
    "dkd_mdistiller": (losses.dkd_loss, functools.partial(ref_dkd_mdistiller, alpha=1.0, beta=8.0,
                                                          temperature=4.0),
                       with_labels(int_labels), 1),
    "dkd_ofa_defaults": (functools.partial(losses.dkd_loss, beta=2.0, temperature=1.0),
                         functools.partial(ref_dkd_mdistiller, alpha=1.0, beta=2.0,
                                           temperature=1.0),
                         with_labels(int_labels), 1),
    "dist": (losses.dist_loss, functools.partial(ref_dist, beta=1.0, gamma=1.0, temperature=1.0),
             logits_pair, 1),
    "dist_weighted": (functools.partial(losses.dist_loss, beta=2.0, gamma=0.5, temperature=4.0),
                      functools.partial(ref_dist, beta=2.0, gamma=0.5, temperature=4.0),
                      logits_pair, 1),
    "ofa_eps1": (losses.ofa_loss, functools.partial(ref_ofa, eps=1.0, temperature=1.0),
                 with_labels(int_labels), 1),
    "ofa_eps15_t2": (functools.partial(losses.ofa_loss, eps=1.5, temperature=2.0),
                     functools.partial(ref_ofa, eps=1.5, temperature=2.0),
                     with_labels(int_labels), 1),
    "ofa_soft_labels": (functools.partial(losses.ofa_loss, eps=1.5),
                        functools.partial(ref_ofa, eps=1.5, temperature=1.0),
                        with_labels(soft_labels), 1),
    "rsd": (losses.rsd_loss, functools.partial(ref_rsd, kappa=0.01, distance="mse",
                                               normalize=True), embeddings, 1),
    "rsd_huber": (functools.partial(losses.rsd_loss, distance="huber", kappa=0.02),
                  functools.partial(ref_rsd, kappa=0.02, distance="huber", normalize=True),
                  embeddings, 1),
    "rsd_unnormalized_huber": (functools.partial(losses.rsd_loss, distance="huber",
                                                 normalize=False),
                               functools.partial(ref_rsd, kappa=0.01, distance="huber",
                                                 normalize=False), embeddings, 1),
    "rsd_grouped": (functools.partial(losses.rsd_loss_grouped, num_groups=4),
                    functools.partial(ref_rsd_grouped, num_groups=4, kappa=0.01, distance="mse",
                                      normalize=True), embeddings, 1),
    "coss": (losses.coss_loss, functools.partial(ref_coss, lambda_ss=1.0, student_temp=0.1,
                                                 teacher_temp=0.07), embeddings, 1),
    "coss_half": (functools.partial(losses.coss_loss, lambda_ss=0.5, student_temp=0.2,
                                    teacher_temp=0.05),
                  functools.partial(ref_coss, lambda_ss=0.5, student_temp=0.2, teacher_temp=0.05),
                  embeddings, 1),
    "hcl_7x7": (losses.hcl_loss, ref_hcl, feature_maps(7), None),
    "hcl_14x14": (losses.hcl_loss, ref_hcl, feature_maps(14), None),
    "hcl_4x4": (losses.hcl_loss, ref_hcl, feature_maps(4), None),
    "hcl_2x2": (losses.hcl_loss, ref_hcl, feature_maps(2), None),
    "hcl_tokens": (losses.hcl_loss, ref_hcl,
                   lambda rng: [rng.normal(size=(3, 10, 5)), rng.normal(size=(3, 10, 5))], None),
    "mse": (losses.mse_loss, ref_mse, feature_maps(5), 1),
}
# One configuration per loss function (and per code path) keeps compile time down.
TEACHER_CASES = ["kd_t4", "dkd_mdistiller", "dist", "ofa_soft_labels", "rsd",
                 "rsd_unnormalized_huber", "rsd_grouped", "coss", "mse"]
BFLOAT16_CASES = ["ce_smoothing", "soft_ce", "kd_t4", "dkd_mdistiller", "dist", "ofa_soft_labels",
                  "rsd", "rsd_grouped", "coss", "hcl_7x7", "hcl_tokens", "mse"]


def make_inputs(name, seed=0):
    """float32 inputs for the loss and the float64 copies the reference sees."""
    inputs = CASES[name][2](np.random.default_rng(seed))
    inputs32 = [x if x.dtype.kind == "i" else x.astype(np.float32) for x in inputs]
    inputs64 = [x if x.dtype.kind == "i" else x.astype(np.float64) for x in inputs32]
    return inputs32, inputs64


# ----------------------------------------------------------------------------------------------
# values


class LossValues(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters((name, name) for name in CASES)
    def test_matches_float64_reference(self, name):
        loss_fn, reference, _, _ = CASES[name]
        assert_float32_scalar_matches(self.variant(loss_fn), reference, *make_inputs(name),
                                      rtol=RTOL, atol=ATOL)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(
        name=["ce_smoothing", "soft_ce", "kd_t1", "dist", "ofa_soft_labels"],
        scale=[1e3, 1e4])
    def test_extreme_logits_finite_and_exact(self, name, scale):
        loss_fn, reference, _, _ = CASES[name]
        inputs32, inputs64 = make_inputs(name)
        inputs32[0] = inputs32[0] * np.float32(scale / 3.0)
        inputs64[0] = inputs32[0].astype(np.float64)
        if name not in ("ce_smoothing", "soft_ce"):
            inputs32[1] = inputs32[1] * np.float32(scale / 3.0)
            inputs64[1] = inputs32[1].astype(np.float64)
        value = self.variant(loss_fn)(*inputs32)
        chex.assert_tree_all_finite(value)
        chex.assert_trees_all_close(value, np.float32(reference(*inputs64)), rtol=RTOL, atol=ATOL)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(1e3, 1e4)
    def test_dkd_extreme_logits_truly_mask_the_target(self, scale):
        """Where mdistiller's -1000 mask fails, DKD equals the target-deleted definition."""
        inputs32, inputs64 = make_inputs("dkd_mdistiller")
        for i in (0, 1):
            inputs32[i] = inputs32[i] * np.float32(scale)
            inputs64[i] = inputs32[i].astype(np.float64)
        value = self.variant(losses.dkd_loss)(*inputs32)
        chex.assert_tree_all_finite(value)
        reference = ref_dkd_exact(*inputs64, alpha=1.0, beta=8.0, temperature=4.0)
        chex.assert_trees_all_close(value, np.float32(reference), rtol=RTOL, atol=ATOL)

    def test_dkd_references_agree_on_moderate_logits(self):
        """The two DKD references differ only where the -1000 mask leaks, not here."""
        _, inputs64 = make_inputs("dkd_mdistiller")
        np.testing.assert_allclose(ref_dkd_mdistiller(*inputs64, 1.0, 8.0, 4.0),
                                   ref_dkd_exact(*inputs64, 1.0, 8.0, 4.0), rtol=1e-12)

    @parameterized.named_parameters(("rsd", "rsd"), ("rsd_huber", "rsd_huber"),
                                    ("coss", "coss"), ("coss_half", "coss_half"))
    def test_constant_features_finite(self, name):
        loss_fn, reference, _, _ = CASES[name]
        value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
        _, other = make_inputs(name)[0]
        for fill in (0.0, 3.0):
            constant = np.full((BATCH, DIM), fill, np.float32)
            for args in ((constant, other), (other, constant), (constant, constant)):
                value, grad = value_and_grad(*args)
                chex.assert_tree_all_finite((value, grad))
                chex.assert_trees_all_close(
                    value, np.float32(reference(*[a.astype(np.float64) for a in args])),
                    rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------
# gradients and dtypes


class LossGradientsAndDtypes(parameterized.TestCase):

    @parameterized.named_parameters((name, name) for name in TEACHER_CASES)
    def test_teacher_gradient_is_zero_student_gradient_is_not(self, name):
        loss_fn, _, _, teacher_index = CASES[name]
        assert_teacher_gets_no_gradient(loss_fn, make_inputs(name)[0], teacher_index)

    def test_hcl_target_is_trained(self):
        """PAT's HCL target (the prompted teacher feature) is not detached: it trains prompts."""
        inputs32, _ = make_inputs("hcl_7x7")
        grad_student, grad_target = jax.jit(jax.grad(losses.hcl_loss, argnums=(0, 1)))(*inputs32)
        chex.assert_trees_all_close(grad_target, -grad_student, rtol=1e-6)
        self.assertGreater(float(jnp.max(jnp.abs(grad_target))), 1e-6)

    @parameterized.named_parameters((name, name) for name in BFLOAT16_CASES)
    def test_bfloat16_inputs_give_float32_scalar(self, name):
        loss_fn = jax.jit(CASES[name][0])
        inputs32, _ = make_inputs(name)
        inputs16 = [x if x.dtype.kind == "i" else jnp.asarray(x, jnp.bfloat16) for x in inputs32]
        value = loss_fn(*inputs16)
        chex.assert_shape(value, ())
        chex.assert_type(value, jnp.float32)
        upcast = [x if x.dtype == jnp.int32 else x.astype(jnp.float32) for x in inputs16]
        chex.assert_trees_all_close(value, loss_fn(*upcast), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# identities and structure


def test_rsd_grouped_one_group_equals_plain_loss():
    inputs32, _ = make_inputs("rsd")
    for kwargs in ({}, {"distance": "huber", "normalize": False, "kappa": 0.1}):
        chex.assert_trees_all_close(losses.rsd_loss_grouped(*inputs32, num_groups=1, **kwargs),
                                    losses.rsd_loss(*inputs32, **kwargs), rtol=1e-6)


def test_rsd_grouped_is_mean_of_group_losses():
    inputs32, _ = make_inputs("rsd")
    groups = [losses.rsd_loss(s, t, kappa=0.02) for s, t in
              zip(np.split(inputs32[0], 4), np.split(inputs32[1], 4))]
    chex.assert_trees_all_close(losses.rsd_loss_grouped(*inputs32, num_groups=4, kappa=0.02),
                                jnp.mean(jnp.stack(groups)), rtol=1e-6)
    # Per-group statistics differ from whole-batch statistics.
    assert abs(float(losses.rsd_loss(*inputs32)) -
               float(losses.rsd_loss_grouped(*inputs32, num_groups=4))) > 1e-3


def test_rsd_errors():
    student, teacher = make_inputs("rsd")[0]
    with pytest.raises(ValueError, match="AAD projector must map D_s to D_t"):
        losses.rsd_loss(student[:, :5], teacher)
    with pytest.raises(ValueError, match="not divisible"):
        losses.rsd_loss_grouped(student, teacher, num_groups=3)
    with pytest.raises(ValueError, match="distance"):
        losses.rsd_loss(student, teacher, distance="l1")


def test_ofa_eps1_is_soft_target_ce_against_teacher_probabilities():
    """With eps = 1 the weights are p_t: OFA = CE(p_t, p_s) = KD / T^2 + H(p_t), any labels."""
    student, teacher, labels = make_inputs("ofa_eps1")[0]
    temperature = 2.0
    value = losses.ofa_loss(student, teacher, labels, eps=1.0, temperature=temperature)
    p_t = np_softmax(teacher.astype(np.float64) / temperature)
    entropy = -(p_t * np.log(p_t)).sum(1).mean()
    kd = ref_kd(student.astype(np.float64), teacher.astype(np.float64), temperature)
    chex.assert_trees_all_close(value, np.float32(kd / temperature ** 2 + entropy), rtol=RTOL)
    chex.assert_trees_all_close(
        value, losses.soft_target_cross_entropy(student / temperature, p_t.astype(np.float32)),
        rtol=RTOL)
    chex.assert_trees_all_close(
        value, losses.ofa_loss(student, teacher, (labels + 1) % CLASSES, eps=1.0,
                               temperature=temperature), rtol=RTOL)


def test_ofa_eps_above_one_boosts_the_target_class():
    """(1 + p_t)^eps - 1 > p_t for eps > 1: the loss differs from eps = 1 through the target."""
    student, teacher, labels = make_inputs("ofa_eps1")[0]
    assert float(losses.ofa_loss(student, teacher, labels, eps=1.5)) != pytest.approx(
        float(losses.ofa_loss(student, teacher, labels, eps=1.0)), rel=1e-3)


def test_to_class_labels():
    labels = np.array([3, 0, 7], np.int32)
    chex.assert_trees_all_equal(losses.to_class_labels(labels), labels)
    soft = np.eye(CLASSES)[labels] * 0.6 + np.eye(CLASSES)[[1, 2, 3]] * 0.4
    chex.assert_trees_all_equal(losses.to_class_labels(soft), labels)
    with pytest.raises(ValueError):
        losses.to_class_labels(np.zeros((2, 3, 4)))


def test_soft_ce_of_one_hot_equals_ce():
    logits, labels = make_inputs("ce")[0]
    chex.assert_trees_all_close(
        losses.soft_target_cross_entropy(logits, np.eye(CLASSES, dtype=np.float32)[labels]),
        losses.cross_entropy(logits, labels), rtol=1e-6)


def test_dkd_and_ofa_accept_soft_labels_as_their_argmax():
    student, teacher, soft = make_inputs("ofa_soft_labels")[0]
    hard = soft.argmax(1).astype(np.int32)
    for loss_fn in (losses.dkd_loss, losses.ofa_loss):
        chex.assert_trees_all_close(loss_fn(student, teacher, soft),
                                    loss_fn(student, teacher, hard), rtol=1e-6)


@pytest.mark.parametrize("call", [
    lambda a, b: losses.kd_loss(a, b[:, :5]),
    lambda a, b: losses.dist_loss(a, b[:4]),
    lambda a, b: losses.dkd_loss(a, b, np.zeros(3, np.int32)),
    lambda a, b: losses.ofa_loss(a, b, np.zeros((BATCH, 3))),
    lambda a, b: losses.cross_entropy(a, np.zeros((BATCH, CLASSES))),
    lambda a, b: losses.cross_entropy(a, np.zeros(BATCH, np.float32)),
    lambda a, b: losses.soft_target_cross_entropy(a, b[:, :3]),
    lambda a, b: losses.coss_loss(a, b[:, :3]),
    lambda a, b: losses.mse_loss(a, b[:, :3]),
    lambda a, b: losses.hcl_loss(a, b[:, :3]),
    lambda a, b: losses.hcl_loss(a, b),
])
def test_shape_mismatch_raises(call):
    student, teacher = make_inputs("kd_t1")[0]
    with pytest.raises(ValueError):
        call(student, teacher)
