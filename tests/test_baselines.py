"""The baseline methods (AT, NST, VID, FT, SP, RKD, PKT, CC, SRRL, SEED, CoSS-BN) and the
unsupervised variants: each total against its parts computed here, FT's two phases, SEED's
queue, the refusals, and one end-to-end distillation per method on the digits."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import distill, losses
from jaxkd.distill import maps
from jaxkd.errors import ConfigError

from helpers import distil_two_steps, method_batch, model_spec, random_outputs

CTX = distill.MethodContext(num_devices=1, label_smoothing=0.1, num_train_examples=64)
BATCH = 8
# A CIFAR-ResNet-like student (three stages) and a ViT-like teacher (four token stages, one
# class token and a 4 x 4 grid): stages pair 1-3, the teacher's tokens as grids.
CNN3 = model_spec("cnn3", "cnn", 10, 16, [(8, 8, 4), (4, 4, 8), (2, 2, 16)])
TOK4 = model_spec("tok4", "vit", 10, 24, [(17, 12)] * 4)
HEAD_W = np.random.RandomState(7).randn(24, 10).astype(np.float32)
HEAD_B = np.random.RandomState(8).randn(10).astype(np.float32)


def _method(name, student=CNN3, teacher=TOK4, ctx=CTX, **fields):
    return distill.create_method(distill.method_config(name, **fields), student, teacher, ctx)


def _views(student=CNN3, teacher=TOK4, seed=3):
    logits, features = random_outputs(teacher, seed + 1)
    return (distill.Outputs(*random_outputs(student, seed)),
            distill.TeacherView(logits, features, head=lambda x: x @ HEAD_W + HEAD_B))


def _init(method, student=CNN3, teacher=TOK4):
    s, t = _views(student, teacher)
    return jax.jit(lambda: method.init(jax.random.PRNGKey(0), s, t, method_batch(10),
                                       train=False))()


def _run(method, variables, s, t, batch, train=True):
    """(terms, new state) of a jitted training-mode apply."""
    mutable = [k for k in variables if k != "params"]
    return jax.jit(lambda v: method.apply(v, s, t, batch, train=train, mutable=mutable,
                                          rngs={"dropout": jax.random.PRNGKey(1)}))(variables)


def _grid(feature):
    """Tokens [B, 1 + 16, C] -> [B, 4, 4, C]; maps as they are (written out for the test)."""
    return feature if feature.ndim == 4 else feature[:, 1:].reshape(feature.shape[0], 4, 4, -1)


def _apply(method, variables, s, t, batch=None):
    """The terms of a jitted training-mode apply without mutable state."""
    batch = method_batch(10) if batch is None else batch
    return jax.jit(lambda v: method.apply(v, s, t, batch, train=True))(variables)


def _ce(s):
    return losses.cross_entropy(s.logits, method_batch(10)["label"], label_smoothing=0.1)


def _check_total(terms, expected):
    """total_loss is the weighted sum, and equals `expected` (the parts computed here)."""
    total, _ = distill.total_loss(terms)
    summed = sum(t.weight * t.value for t in terms.values() if t.weight is not None)
    chex.assert_trees_all_close(total, summed, rtol=1e-6)
    chex.assert_trees_all_close(total, expected, rtol=2e-5)


# --- stage-map methods ---------------------------------------------------------------------

@pytest.mark.parametrize("name,loss_fn,field", [("at", losses.at_loss, "at_weight"),
                                                ("nst", losses.nst_loss, "nst_weight")])
def test_map_method_is_ce_plus_weighted_sum_over_paired_stages(name, loss_fn, field):
    method = _method(name, **{field: 7.0})
    s, t = _views()
    terms = _apply(method, {}, s, t)
    parts = [jax.jit(loss_fn)(_grid(a), _grid(b)) for a, b in
             zip(s.features["stages"], t.features["stages"][:3])]  # 3 stages pair
    assert sorted(terms) == sorted(["ce", name] + [f"{name}_stage{i}" for i in (1, 2, 3)])
    _check_total(terms, _ce(s) + 7.0 * sum(parts))
    chex.assert_trees_all_close(terms[f"{name}_stage2"].value, parts[1], rtol=1e-5)


def test_vid_regresses_each_pooled_stage_with_its_variance():
    method = _method("vid", vid_weight=0.5)
    variables = _init(method)
    params = variables["params"]
    start = np.log(np.expm1(5.0 - 1e-5))
    assert np.allclose(params["log_scale1"], start) and params["log_scale3"].shape == (12,)
    variables = {"params": jax.tree.map(lambda p: p + 0.05, params)}
    s, t = _views()
    terms = _apply(method, variables, s, t)
    parts = []
    for i, (a, b) in enumerate(zip(s.features["stages"], t.features["stages"][:3])):
        a, b = losses.pool_to_smaller(_grid(a), _grid(b))  # stage 1: the 8x8 map to 4x4
        p = variables["params"][f"regressor{i + 1}"]
        x = np.asarray(a)
        for j, conv in enumerate(("conv1", "conv2", "conv3")):
            x = x @ np.asarray(p[conv]["kernel"][0, 0])
            x = np.maximum(x, 0) if j < 2 else x
        parts.append(losses.vid_loss(x, b, variables["params"][f"log_scale{i + 1}"]))
    _check_total(terms, _ce(s) + 0.5 * sum(parts))


# --- FT's two phases -----------------------------------------------------------------------

def _ft_expected(method, variables, s, t, encoder_params):
    """(reconstruction MSE with the live paraphraser, FT loss with `encoder_params`)."""
    target = _grid(t.features["stages"][-1])
    channels = int(12 * method.factor_rate)
    encoder = maps.ParaphraserEncoder(channels)
    decoder = maps.ParaphraserDecoder(12)
    live = variables["params"]["paraphraser"]
    reconstruction = decoder.apply({"params": live["decoder"]},
                                   encoder.apply({"params": live["encoder"]}, target))
    factor_s, _ = maps.Translator(channels).apply(
        {"params": variables["params"]["translator"],
         "batch_stats": variables["batch_stats"]["translator"]},
        _grid(s.features["stages"][-1]), train=True, mutable=["batch_stats"])
    factor_t = encoder.apply({"params": encoder_params}, target)
    return (losses.mse_loss(reconstruction, target),
            losses.factor_transfer_loss(factor_s, factor_t))


def test_ft_pretrains_the_paraphraser_then_freezes_it_for_the_transfer():
    # 64 train examples / batch 8 = 8 steps an epoch: 0.25 epochs = 2 pre-training steps.
    method = _method("ft", paraphraser_epochs=0.25, paraphraser_weight=0.2, ft_weight=10.0)
    variables = _init(method)
    s, t = _views()
    rng = np.random.RandomState(0)
    expected = jax.jit(lambda *args: _ft_expected(method, *args))
    encoders = []
    for step in range(1, 5):
        # Stands in for the optimiser: the paraphraser's parameters move every step.
        variables = {**variables, "params": {**variables["params"], "paraphraser": jax.tree.map(
            lambda p: p + 0.01 * rng.randn(*p.shape).astype(np.float32),
            variables["params"]["paraphraser"])}}
        encoders.append(variables["params"]["paraphraser"]["encoder"])
        terms, state = _run(method, variables, s, t, method_batch(10))
        pretraining = step <= 2
        # The first main step (3) reads the encoder as the last pre-training step left it.
        reconstruction, ft = expected(variables, s, t._replace(head=None),
                                      encoders[min(step, 3) - 1])
        weights = [terms[k].weight for k in ("ce", "ft", "ft_reconstruction")]
        np.testing.assert_allclose(weights, [0.0, 0.0, 0.2] if pretraining else
                                   [1.0, 10.0, 0.0])
        chex.assert_trees_all_close((terms["ft_reconstruction"].value, terms["ft"].value),
                                    (reconstruction, ft), rtol=2e-5)
        assert int(state["counters"]["steps"]) == step
        variables = {**variables, **state}


# --- relational methods --------------------------------------------------------------------

def _halves(loss_fn, a, b):
    return np.mean([jax.jit(loss_fn)(x, y) for x, y in zip(np.split(np.asarray(a), 2),
                                                  np.split(np.asarray(b), 2))])


@pytest.mark.parametrize("name,field", [("sp", "sp_weight"), ("rkd", "rkd_weight"),
                                        ("pkt", "pkt_weight")])
def test_relational_method_statistics_per_group(name, field):
    method = _method(name, stats_groups=2, **{field: 3.0})
    s, t = _views()
    terms = _apply(method, {}, s, t)
    if name == "sp":
        value = _halves(losses.sp_loss, s.features["stages"][-1], t.features["stages"][-1])
    else:
        loss_fn = losses.rkd_loss if name == "rkd" else losses.pkt_loss
        value = _halves(loss_fn, s.features["embedding"], t.features["embedding"])
    _check_total(terms, _ce(s) + 3.0 * value)
    if name == "rkd":
        chex.assert_trees_all_close(
            25 * terms["rkd_distance"].value + 50 * terms["rkd_angle"].value,
            terms["rkd"].value, rtol=1e-6)
    one_group = _apply(_method(name, stats_groups=1), {}, s, t)
    assert abs(float(one_group[name].value) - float(terms[name].value)) > 1e-7


def test_cc_embeds_both_sides_to_128_and_trains_both_embeddings():
    method = _method("cc", stats_groups=1)
    variables = _init(method)
    p = variables["params"]
    assert p["embed_student"]["linear"]["kernel"].shape == (16, 128)
    assert p["embed_teacher"]["linear"]["kernel"].shape == (24, 128)
    s, t = _views()
    terms = _apply(method, variables, s, t)
    embed = lambda e, side: (np.asarray(e) @ p[side]["linear"]["kernel"]  # noqa: E731
                             + p[side]["linear"]["bias"])
    value = losses.cc_loss(embed(s.features["embedding"], "embed_student"),
                           embed(t.features["embedding"], "embed_teacher"))
    _check_total(terms, _ce(s) + 0.02 * value)
    grads = jax.jit(jax.grad(lambda v: method.apply(v, s, t, method_batch(10),
                                                    train=True)["cc"].value))(variables)
    assert float(jnp.abs(grads["params"]["embed_teacher"]["linear"]["kernel"]).max()) > 0


# --- SRRL ----------------------------------------------------------------------------------

def test_srrl_regresses_features_and_logits_through_the_teacher_head():
    method = _method("srrl", feature_weight=0.5, logits_weight=2.0)
    variables = _init(method)
    s, t = _views()
    terms, _ = _run(method, variables, s, t, method_batch(10))
    p = variables["params"]["connector"]
    x = np.asarray(s.features["embedding"]) @ np.asarray(p["proj"]["kernel"])
    x = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
    connected = np.maximum(x, 0)
    feature = losses.mse_loss(connected, t.features["embedding"])
    logits = losses.mse_loss(connected @ HEAD_W + HEAD_B, t.logits)
    _check_total(terms, _ce(s) + 0.5 * feature + 2.0 * logits)
    assert distill.method_requirements("srrl").teacher_head
    with pytest.raises(ConfigError, match="TeacherView.head"):
        method.apply(variables, s, t._replace(head=None), method_batch(10), train=False)


# --- SEED, CoSS-BN -------------------------------------------------------------------------

def test_seed_enqueues_teacher_outputs_and_adds_space_similarity():
    method = _method("seed", queue_size=16, ss_weight=0.5, stats_groups=2)
    variables = _init(method)
    queue = np.asarray(variables["queue"]["keys"])
    assert queue.shape == (16, 24)
    np.testing.assert_allclose(np.linalg.norm(queue, axis=1), 1.0, rtol=1e-5)
    head = variables["params"]["head"]
    for step, seed in enumerate((3, 5, 7)):
        s, t = _views(seed=seed)
        terms, state = _run(method, variables, s, t, {"index": method_batch(10)["index"]})
        e = np.maximum(np.asarray(s.features["embedding"]) @ head["fc1"]["kernel"]
                       + head["fc1"]["bias"], 0) @ head["fc2"]["kernel"] + head["fc2"]["bias"]
        target = t.features["embedding"]
        expected = (losses.seed_loss(e, target, variables["queue"]["keys"]) +
                    0.5 * _halves(losses.space_similarity_loss, e, target))
        _check_total(terms, expected)
        rows = slice(8 * (step % 2), 8 * (step % 2) + 8)
        np.testing.assert_allclose(state["queue"]["keys"][rows],
                                   target / np.linalg.norm(target, axis=1, keepdims=True),
                                   rtol=1e-5, atol=1e-6)
        assert int(state["queue"]["pointer"]) == 8 * ((step + 1) % 2)
        variables = {**variables, **state}
    with pytest.raises(ConfigError, match="whole number of batches"):
        _init(_method("seed", queue_size=12))


def test_coss_bn_maps_the_standardised_student_to_the_teacher_space():
    method = _method("coss_bn", loss_scale=2.0, hidden_dim=6)
    variables = _init(method)
    s, t = _views()
    terms, _ = _run(method, variables, s, t, {"index": method_batch(10)["index"]})
    p = variables["params"]
    h = np.maximum(np.asarray(s.features["embedding"]) @ p["head"]["Dense_0"]["kernel"] +
                   p["head"]["Dense_0"]["bias"], 0)
    h = h @ p["head"]["Dense_1"]["kernel"] + p["head"]["Dense_1"]["bias"]  # 16 -> 24
    z = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
    _check_total(terms, 2.0 * losses.mse_loss(z, t.features["embedding"]))


# --- unsupervised variants -----------------------------------------------------------------

UNSUPERVISED = ["at", "nst", "vid", "ft", "sp", "rkd", "pkt", "cc", "srrl", "crd", "rsd"]


@pytest.mark.parametrize("name", UNSUPERVISED)
def test_unsupervised_variant_drops_ce_and_logit_terms_and_scales_the_rest(name):
    fields = {"num_negatives": 4} if name == "crd" else {}
    supervised = _method(name, **fields, **({"negatives": "uniform"} if name == "crd" else {}))
    unsupervised = _method(f"{name}_unsup", loss_scale=3.0, **fields)
    requires = distill.method_requirements(f"{name}_unsup")
    assert not (requires.labels or requires.train_labels or requires.teacher_head)
    variables = _init(supervised)
    s, t = _views()
    expected, _ = _run(supervised, variables, s, t, method_batch(10))
    # No 'label' in the batch: reading it would fail.
    got, _ = _run(unsupervised, variables, s, t, {"index": method_batch(10)["index"]})
    dropped = {"ce"} | ({"srrl_logits"} if name == "srrl" else set())
    assert set(got) == set(expected) - dropped
    for key, term in got.items():
        scale = 1.0 if key in unsupervised.unscaled_terms else 3.0
        want = expected[key]
        assert (term.weight is None) == (want.weight is None), key
        if term.weight is not None:
            np.testing.assert_allclose(term.weight, scale * want.weight, rtol=1e-6)
        chex.assert_trees_all_close(term.value, want.value, rtol=1e-5)


def test_unsupervised_variants_refuse_label_or_logit_settings():
    with pytest.raises(ConfigError, match="negatives='uniform'"):
        _method("crd_unsup", negatives="other_class")
    with pytest.raises(ConfigError, match="target must be 'embedding'"):
        _method("rsd_unsup", target="logits")
    assert distill.method_config("crd_unsup").negatives == "uniform"


# --- defaults and refusals -----------------------------------------------------------------

# The original codes' defaults: RepDistiller's scripts (betas) and criteria, the OFA-KD code's
# CC and RKD arguments, SimKD's SRRL, SEED's options.
DEFAULTS = {
    "at": {"at_weight": 1000.0, "p": 2.0},
    "nst": {"nst_weight": 50.0},
    "vid": {"vid_weight": 1.0, "init_variance": 5.0},
    "ft": {"ft_weight": 200.0, "factor_rate": 0.5, "p1": 2.0, "p2": 1.0,
           "paraphraser_epochs": 30.0},
    "sp": {"sp_weight": 3000.0},
    "rkd": {"rkd_weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0,
            "squared": False, "eps": 1e-12},
    "pkt": {"pkt_weight": 30000.0},
    "cc": {"cc_weight": 0.02, "feat_dim": 128},
    "srrl": {"feature_weight": 1.0, "logits_weight": 1.0},
    "seed": {"queue_size": 65536, "student_temp": 0.2, "teacher_temp": 1e-4, "ss_weight": 0.0},
}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_defaults_are_the_original_codes(name):
    config = distill.method_config(name)
    assert {k: config[k] for k in DEFAULTS[name]} == DEFAULTS[name]
    if name != "seed":
        unsupervised = distill.method_config(f"{name}_unsup")
        assert unsupervised.loss_scale == 1.0
        assert {k: unsupervised[k] for k in DEFAULTS[name]} == DEFAULTS[name]


@pytest.mark.parametrize("name,fields,match", [
    ("at", {}, "not a square"),
    ("ft", {"paraphraser_epochs": 0.0}, "paraphraser_epochs"),
    ("vid", {"init_variance": 0.0}, "init_variance"),
    ("seed", {"teacher_output": "head"}, "teacher_output"),
    ("sp", {"stats_groups": -1}, "stats_groups"),
])
def test_bad_settings_are_refused(name, fields, match):
    student = (model_spec("odd", "cnn", 10, 16, [(4, 2, 8)]) if match == "not a square"
               else CNN3)
    with pytest.raises(ConfigError, match=match):
        _method(name, student=student, **fields)


def test_teacher_head_needs_a_teacher():
    with pytest.raises(ValueError, match="needs a teacher"):
        distill.Requirements(teacher="none", teacher_head=True)


# --- end to end on the digits --------------------------------------------------------------

# (method, student kind, teacher kind, method fields, metrics each step must report). 2 steps
# of 16 images: FT pre-trains its paraphraser for the first (1437 // 16 = 89 steps an epoch).
RUNS = [
    ("at", "vit", "cnn", {}, ["ce", "at", "at_stage4"]),
    ("nst", "cnn", "vit", {}, ["ce", "nst", "nst_stage1"]),
    ("vid", "vit", "vit", {}, ["ce", "vid", "vid_stage2"]),
    ("ft", "vit", "vit", {"paraphraser_epochs": 1 / 89}, ["ce", "ft", "ft_reconstruction"]),
    ("sp", "vit", "vit", {}, ["ce", "sp"]),
    ("rkd", "vit", "vit", {}, ["ce", "rkd", "rkd_distance", "rkd_angle"]),
    ("pkt", "vit", "vit", {}, ["ce", "pkt"]),
    ("cc", "vit", "vit", {}, ["ce", "cc"]),
    ("srrl", "vit", "vit", {}, ["ce", "srrl_feature", "srrl_logits"]),
    ("seed", "vit", "vit", {"queue_size": 32, "ss_weight": 1.0},
     ["seed", "space_similarity"]),
    ("coss_bn", "vit", "vit", {}, ["coss_bn"]),
    # The unsupervised variants share one mechanism (jaxkd.distill.feature), tested per
    # method above: one of them runs here.
    ("vid_unsup", "vit", "vit", {"loss_scale": 2.0}, ["vid"]),
]


@pytest.mark.parametrize("method,student,teacher,fields,reported", RUNS,
                         ids=[r[0] for r in RUNS])
def test_baseline_distills_end_to_end(tmp_path, digits_dir, teachers, method, student,
                                      teacher, fields, reported):
    _, result, steps = distil_two_steps(tmp_path, digits_dir, teachers, method, student,
                                        teacher, **fields)
    supervised = distill.method_requirements(method).labels
    if supervised:
        assert 0.0 <= result["eval/top1"] <= 100.0
    else:  # evaluated by k-NN of the embedding; no train top-1
        assert "eval/top1" not in result and 0.0 <= result["eval/knn_top1"] <= 100.0
    for m in steps:
        assert all(np.isfinite(m[f"train/{k}"]) for k in ["loss", *reported])
        assert ("train/top1" in m) == supervised
    if method == "ft":  # step 1 trains the paraphraser alone, step 2 the student
        first, second = steps
        np.testing.assert_allclose(first["train/loss"], first["train/ft_reconstruction"],
                                   rtol=1e-5)
        np.testing.assert_allclose(second["train/loss"],
                                   second["train/ce"] + 200.0 * second["train/ft"], rtol=1e-5)
