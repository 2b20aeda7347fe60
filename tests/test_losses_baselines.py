"""The baseline losses (AT, FT, NST, VID, SP, RKD, PKT, CC, SEED, space similarity) against
float64 references written from the original code's formulas (RepDistiller, the OFA-KD code,
SEED), on random and on extreme inputs."""

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

BATCH, DIM, QUEUE = 8, 12, 24
RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------------------------
# float64 references (NHWC arrays in, as the losses take them)


def pooled_pair(s, t):
    """The larger map adaptively pooled (torch, float64) to the smaller's height."""
    def pool(x, size):
        y = torch_f.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), (size, size))
        return y.permute(0, 2, 3, 1).numpy()

    if s.shape[1] > t.shape[1]:
        return pool(s, t.shape[1]), t
    if s.shape[1] < t.shape[1]:
        return s, pool(t, s.shape[1])
    return s, t


def normalize_rows(x, axis=1):
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def ref_attention(f, p):
    return normalize_rows((f ** p).mean(axis=3).reshape(len(f), -1))


def ref_at(s, t, p=2):
    s, t = pooled_pair(s, t)
    return ((ref_attention(s, p) - ref_attention(t, p)) ** 2).mean()


def ref_ft(s, t, p1=2, p2=1):
    s, t = pooled_pair(s, t)
    diff = ref_attention(s, p1) - ref_attention(t, p1)
    return np.abs(diff).mean() if p2 == 1 else (diff ** p2).mean()


def ref_nst(s, t):
    s, t = pooled_pair(s, t)

    def responses(f):  # [B, C, HW], each channel's map normalised
        return normalize_rows(f.reshape(len(f), -1, f.shape[3]).transpose(0, 2, 1), axis=2)

    def kernel(a, b):  # the original's poly_kernel: res[n, i, j] = (a[n, j] . b[n, i])^2
        return np.array([[[(a[n, j] @ b[n, i]) ** 2 for j in range(a.shape[1])]
                          for i in range(b.shape[1])] for n in range(len(a))]).mean()

    r_s, r_t = responses(s), responses(t)
    return kernel(r_t, r_t) + kernel(r_s, r_s) - 2 * kernel(r_s, r_t)


def ref_vid(mean, target, log_scale, eps=1e-5):
    var = np.log(1.0 + np.exp(log_scale)) + eps
    return (0.5 * ((mean - target) ** 2 / var + np.log(var))).mean()


def ref_sp(s, t):
    def gram(f):
        f = f.reshape(len(f), -1)
        return normalize_rows(f @ f.T)

    return ((gram(t) - gram(s)) ** 2).sum() / len(s) ** 2


def ref_smooth_l1(x, y):
    d = np.abs(x - y)
    return np.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()


def ref_pdist(e, squared=False, eps=1e-12):
    sq = (e ** 2).sum(1)
    res = np.maximum(sq[:, None] + sq[None, :] - 2 * e @ e.T, eps)
    if not squared:
        res = np.sqrt(res)
    np.fill_diagonal(res, 0.0)
    return res


def ref_rkd_distance(s, t, squared=False):
    d_s, d_t = ref_pdist(s, squared), ref_pdist(t, squared)
    return ref_smooth_l1(d_s / d_s[d_s > 0].mean(), d_t / d_t[d_t > 0].mean())


def ref_angles(e):
    b = len(e)
    out = np.zeros((b, b, b))
    for i in range(b):
        diffs = normalize_rows(e - e[i])  # row j: e_j - e_i
        out[i] = diffs @ diffs.T
    return out


def ref_rkd_angle(s, t):
    return ref_smooth_l1(ref_angles(s), ref_angles(t))


def ref_rkd(s, t, distance_weight=25.0, angle_weight=50.0):
    return distance_weight * ref_rkd_distance(s, t) + angle_weight * ref_rkd_angle(s, t)


def ref_pkt(s, t, eps=1e-7):
    def probabilities(x):
        x = x / (np.sqrt((x ** 2).sum(1, keepdims=True)) + eps)
        sim = (x @ x.T + 1.0) / 2.0
        return sim / sim.sum(1, keepdims=True)

    p_s, p_t = probabilities(s), probabilities(t)
    return (p_t * np.log((p_t + eps) / (p_s + eps))).mean()


def ref_cc(s, t):
    delta = np.abs(s - t)
    return (delta[:-1] * delta[1:]).sum(1).mean()


def ref_seed(s, t, queue, student_temp=0.2, teacher_temp=1e-4):
    s, t = normalize_rows(s), normalize_rows(t)
    logits_s = np.concatenate([(s * t).sum(1, keepdims=True), s @ queue.T], 1) / student_temp
    logits_t = np.concatenate([(t * t).sum(1, keepdims=True), t @ queue.T], 1) / teacher_temp
    targets = np.exp(logits_t - logits_t.max(1, keepdims=True))
    targets /= targets.sum(1, keepdims=True)
    log_p = logits_s - logits_s.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    return -(targets * log_p).sum(1).mean()


def ref_space_similarity(s, t):
    return -(normalize_rows(s, 0) * normalize_rows(t, 0)).sum(0).mean()


def ref_grouped(reference, num_groups):
    return lambda *arrays: np.mean([reference(*parts) for parts in
                                    zip(*[np.split(a, num_groups) for a in arrays])])


# ----------------------------------------------------------------------------------------------
# inputs and cases: (jax loss, float64 reference, input maker, index of the teacher argument)


def maps(student_hw, teacher_hw, student_c=5, teacher_c=7):
    def make(rng):
        return [rng.normal(size=(BATCH, student_hw, student_hw, student_c)),
                rng.normal(size=(BATCH, teacher_hw, teacher_hw, teacher_c))]
    return make


def embeddings(rng, dim_s=DIM, dim_t=DIM):
    shared = rng.normal(size=(BATCH, min(dim_s, dim_t)))
    s = rng.normal(size=(BATCH, dim_s))
    t = 2.0 * rng.normal(size=(BATCH, dim_t))
    s[:, :shared.shape[1]] += shared
    t[:, :shared.shape[1]] += shared
    return [s, t]


def vid_inputs(rng):
    return [rng.normal(size=(BATCH, 3, 3, 6)), rng.normal(size=(BATCH, 3, 3, 6)),
            rng.normal(size=6)]


def seed_inputs(rng):
    s, t = embeddings(rng)
    return [s, t, normalize_rows(rng.normal(size=(QUEUE, DIM)))]


CASES = {
    "at_same_size": (losses.at_loss, ref_at, maps(4, 4), 1),
    "at_student_larger": (losses.at_loss, ref_at, maps(8, 4), 1),
    "at_teacher_larger_uneven": (losses.at_loss, ref_at, maps(3, 7), 1),
    "at_p4": (functools.partial(losses.at_loss, p=4), functools.partial(ref_at, p=4),
              maps(4, 4), 1),
    "ft": (losses.factor_transfer_loss, ref_ft, maps(6, 3, 4, 4), 1),
    "ft_p2": (functools.partial(losses.factor_transfer_loss, p2=2),
              functools.partial(ref_ft, p2=2), maps(4, 4, 4, 4), 1),
    "nst": (losses.nst_loss, ref_nst, maps(4, 4), 1),
    "nst_pooled": (losses.nst_loss, ref_nst, maps(5, 2), 1),
    "vid": (losses.vid_loss, ref_vid, vid_inputs, 1),
    "sp_maps": (losses.sp_loss, ref_sp, maps(4, 2), 1),
    "sp_embeddings": (losses.sp_loss, ref_sp, functools.partial(embeddings, dim_t=20), 1),
    "rkd_distance": (losses.rkd_distance_loss, ref_rkd_distance, embeddings, 1),
    "rkd_distance_squared": (functools.partial(losses.rkd_distance_loss, squared=True),
                             functools.partial(ref_rkd_distance, squared=True), embeddings, 1),
    "rkd_angle": (losses.rkd_angle_loss, ref_rkd_angle,
                  functools.partial(embeddings, dim_t=20), 1),
    "rkd": (losses.rkd_loss, ref_rkd, embeddings, 1),
    "pkt": (losses.pkt_loss, ref_pkt, functools.partial(embeddings, dim_t=20), 1),
    "cc": (losses.cc_loss, ref_cc, embeddings, None),
    "seed": (losses.seed_loss, ref_seed, seed_inputs, 1),
    "seed_warm_teacher": (functools.partial(losses.seed_loss, student_temp=0.1,
                                            teacher_temp=0.5),
                          functools.partial(ref_seed, student_temp=0.1, teacher_temp=0.5),
                          seed_inputs, 1),
    "space_similarity": (losses.space_similarity_loss, ref_space_similarity, embeddings, 1),
    "rkd_grouped": (lambda s, t: losses.mean_over_groups("rkd", losses.rkd_loss, 2, s, t),
                    ref_grouped(ref_rkd, 2), embeddings, 1),
    "sp_grouped": (lambda s, t: losses.mean_over_groups("sp", losses.sp_loss, 4, s, t),
                   ref_grouped(ref_sp, 4), maps(2, 2), 1),
}
TEACHER_CASES = ["at_teacher_larger_uneven", "ft", "nst_pooled", "vid", "sp_maps", "rkd",
                 "pkt", "seed", "space_similarity"]


def make_inputs(name, seed=0, scale=1.0):
    inputs = CASES[name][2](np.random.default_rng(seed))
    inputs32 = [(x * scale).astype(np.float32) for x in inputs]
    if name.startswith("seed"):  # the queue holds unit vectors whatever the scale
        inputs32[2] = inputs[2].astype(np.float32)
    if name == "vid":  # the log-variance is a parameter, not a feature
        inputs32[2] = inputs[2].astype(np.float32)
    return inputs32, [x.astype(np.float64) for x in inputs32]


class BaselineLossValues(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters((name, name) for name in CASES)
    def test_matches_float64_reference(self, name):
        loss_fn, reference, _, _ = CASES[name]
        assert_float32_scalar_matches(self.variant(loss_fn), reference, *make_inputs(name),
                                      rtol=RTOL, atol=ATOL)

    @parameterized.product(name=["at_student_larger", "ft", "nst", "vid", "sp_maps", "rkd",
                                 "pkt", "cc", "seed", "space_similarity"],
                           scale=[1e-3, 1e3])
    def test_extreme_scales_finite_and_exact(self, name, scale):
        loss_fn, reference, _, _ = CASES[name]
        inputs32, inputs64 = make_inputs(name, scale=scale)
        value = jax.jit(loss_fn)(*inputs32)
        chex.assert_tree_all_finite(value)
        # Scale-invariant losses keep their value; CC, VID and SP's scale-free form shift, the
        # reference sees the same scaled inputs.
        chex.assert_trees_all_close(value, np.float32(reference(*inputs64)), rtol=1e-4,
                                    atol=ATOL)

    @parameterized.named_parameters(("rkd", "rkd"), ("pkt", "pkt"), ("sp", "sp_maps"),
                                    ("at", "at_same_size"), ("nst", "nst"), ("ft", "ft_p2"),
                                    ("seed", "seed"), ("space_similarity", "space_similarity"))
    def test_degenerate_inputs_finite(self, name):
        """Zero features, and a batch whose examples are all equal (RKD's distances all hit
        the clamp): values as the reference, gradients finite."""
        loss_fn, reference, _, _ = CASES[name]
        inputs32, _ = make_inputs(name)
        value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
        constant = np.broadcast_to(inputs32[0][:1], inputs32[0].shape).copy()
        for student in (np.zeros_like(inputs32[0]), constant):
            args = [student, *inputs32[1:]]
            value, grad = value_and_grad(*args)
            chex.assert_tree_all_finite((value, grad))
            chex.assert_trees_all_close(
                value, np.float32(reference(*[a.astype(np.float64) for a in args])),
                rtol=1e-4, atol=ATOL)

    def test_vid_large_log_scale_is_finite(self):
        """softplus where the original's log(1 + exp(x)) overflows float32 at x > 88."""
        mean, target, _ = make_inputs("vid")[0]
        log_scale = np.full(6, 100.0, np.float32)
        value = losses.vid_loss(mean, target, log_scale)
        chex.assert_tree_all_finite(value)
        chex.assert_trees_all_close(value, np.float32(ref_vid(
            mean.astype(np.float64), target.astype(np.float64), log_scale.astype(np.float64))),
            rtol=RTOL)


class BaselineLossGradients(parameterized.TestCase):

    @parameterized.named_parameters((name, name) for name in TEACHER_CASES)
    def test_teacher_gradient_is_zero_student_gradient_is_not(self, name):
        loss_fn, _, _, teacher_index = CASES[name]
        assert_teacher_gets_no_gradient(loss_fn, make_inputs(name)[0], teacher_index)

    def test_cc_trains_both_embeddings(self):
        """CC's teacher side is a trainable embedding of the frozen features: not detached."""
        s, t = make_inputs("cc")[0]
        grad_s, grad_t = jax.grad(losses.cc_loss, argnums=(0, 1))(s, t)
        self.assertGreater(float(jnp.max(jnp.abs(grad_t))), 1e-6)
        chex.assert_tree_all_finite((grad_s, grad_t))

    def test_vid_trains_the_variance(self):
        mean, target, log_scale = make_inputs("vid")[0]
        grad = jax.grad(losses.vid_loss, argnums=2)(mean, target, log_scale)
        self.assertGreater(float(jnp.max(jnp.abs(grad))), 1e-6)

    @parameterized.named_parameters(("at", "at_student_larger"), ("nst", "nst"), ("vid", "vid"),
                                    ("rkd", "rkd"), ("pkt", "pkt"), ("seed", "seed"))
    def test_bfloat16_inputs_give_float32_scalar(self, name):
        loss_fn = jax.jit(CASES[name][0])
        inputs32, _ = make_inputs(name)
        inputs16 = [jnp.asarray(x, jnp.bfloat16) for x in inputs32]
        value = loss_fn(*inputs16)
        chex.assert_shape(value, ())
        chex.assert_type(value, jnp.float32)
        chex.assert_trees_all_close(value, loss_fn(*[x.astype(jnp.float32) for x in inputs16]),
                                    rtol=1e-6)


def test_identical_features_give_zero_loss():
    s, _ = make_inputs("rkd")[0]
    m, _ = make_inputs("at_same_size")[0]
    for loss_fn, x in ((losses.rkd_loss, s), (losses.pkt_loss, s), (losses.sp_loss, s),
                       (losses.at_loss, m), (losses.nst_loss, m),
                       (losses.factor_transfer_loss, m)):
        assert abs(float(loss_fn(x, x))) < 1e-6, loss_fn.__name__


def test_rkd_distance_is_scale_invariant_and_angle_translation_invariant():
    s, t = make_inputs("rkd")[0]
    chex.assert_trees_all_close(losses.rkd_distance_loss(3.0 * s, t),
                                losses.rkd_distance_loss(s, t), rtol=1e-5)
    chex.assert_trees_all_close(losses.rkd_angle_loss(s + 5.0, t), losses.rkd_angle_loss(s, t),
                                rtol=1e-4)


@pytest.mark.parametrize("call", [
    lambda m, e: losses.at_loss(m, m[:4]),
    lambda m, e: losses.at_loss(e, e),
    lambda m, e: losses.nst_loss(m[..., 0], m),
    lambda m, e: losses.vid_loss(m, m[:, :2], np.zeros(m.shape[-1], np.float32)),
    lambda m, e: losses.vid_loss(m, m, np.zeros(3, np.float32)),
    lambda m, e: losses.sp_loss(e, e[:4]),
    lambda m, e: losses.rkd_loss(e[:1], e[:1]),
    lambda m, e: losses.cc_loss(e, e[:, :5]),
    lambda m, e: losses.seed_loss(e, e, np.zeros((QUEUE, 5), np.float32)),
    lambda m, e: losses.seed_loss(e, e[:, :5], np.zeros((QUEUE, DIM), np.float32)),
    lambda m, e: losses.space_similarity_loss(e, e[:, :5]),
    lambda m, e: losses.mean_over_groups("rkd", losses.rkd_loss, 3, e, e),
])
def test_bad_shapes_raise(call):
    m, e = make_inputs("at_same_size")[0][0], make_inputs("rkd")[0][0]
    with pytest.raises(ValueError):
        call(m, e)
