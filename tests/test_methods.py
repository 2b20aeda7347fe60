"""The method zoo: extra-parameter figures, OFA branches, each method's loss against its parts,
CRD's memory banks, and one end-to-end distillation run per method on the digits."""

import math
import os

import chex
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxkd import build, checkpoint, distill, losses, models, recipes, run_config, sharding, step
from jaxkd.distill import crd, fitnet, ofa, rsd
from jaxkd.errors import ConfigError

from helpers import apply_method, distil_two_steps
from helpers import method_batch as _batch
from helpers import model_spec as _spec
from helpers import random_outputs as _outputs

TRAIN_LABELS = np.arange(50) % 10  # CRD's other-class negatives read them
CTX = distill.MethodContext(num_devices=1, label_smoothing=0.1, num_train_examples=50,
                            train_labels=TRAIN_LABELS)
BATCH = 8


def _maps(channels, side=56):
    return [(side >> i, side >> i, c) for i, c in enumerate(channels)]


def _method(name, student, teacher, ctx=CTX, **fields):
    return distill.create_method(distill.method_config(name, **fields), student, teacher, ctx)


def _init(method, student, teacher, batch=BATCH):
    """Jitted: eager Flax init compiles every primitive on its own, which is much slower."""
    return jax.jit(lambda: method.init(
        jax.random.PRNGKey(0), distill.Outputs(*_outputs(student, 1, batch)),
        distill.TeacherView(*_outputs(teacher, 2, batch)), _batch(student.num_classes, batch),
        train=False))()


def _random_variables(method, student, teacher):
    """Variables of `method`'s shapes filled from NumPy: the loss checks need any values, and
    this skips compiling the initialisers. BN variances are 1, other state 0."""
    shapes = jax.eval_shape(lambda: _init(method, student, teacher))
    rng = np.random.RandomState(0)

    def fill(path, leaf):
        collection, name = path[0].key, path[-1].key
        if collection == "params":
            return jnp.asarray(0.1 * rng.randn(*leaf.shape), leaf.dtype)
        return jnp.full(leaf.shape, 1 if name == "var" else 0, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _apply(module, variables, *args, **kwargs):
    """Jitted module.apply (keyword arguments are static)."""
    return jax.jit(lambda v, a: module.apply(v, *a, **kwargs))(variables, args)


def _apply_method(method, variables, *args, **kwargs):
    """Jitted helpers.apply_method (keyword arguments are static)."""
    return jax.jit(lambda v, a: apply_method(method, v, *a, **kwargs))(variables, args)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# --- extra parameters: REFERENCE.md section 2 ------------------------------------------------

# (teacher, student, classes, RSD expansion, OFA millions, RSD millions)
FIGURES = [
    ("swin_t", "res18", 100, 2.0, 1.63, 1.31),
    ("vit_s", "res18", 100, 2.0, 1.19, 0.92),
    ("swin_t", "mbv2", 100, 2.0, 2.53, 5.25),
    ("convnext_t", "deit_t", 100, 2.0, 3.78, 0.37),
    ("convnext_t", "swin_p", 100, 2.0, 14.86, 0.89),
    ("convnext_t", "resmlp_s12", 100, 2.0, 14.94, 0.89),
    ("convnext_t", "swin_n", 1000, 4.0, 28.19, 2.63),
    ("swin_t", "res18", 1000, 4.0, 4.39, 2.63),
]


def _swin_maps(embed):
    return _maps([embed, 2 * embed, 4 * embed, 8 * embed])


# The dims of REFERENCE.md section 2 written out: (family, embedding, stage shapes at 224 px).
HAND_WRITTEN = {
    "res18": ("cnn", 512, _maps([64, 128, 256, 512])),
    "mbv2": ("cnn", 1280, _maps([24, 32, 96, 1280])),
    "convnext_t": ("cnn", 768, _maps([96, 192, 384, 768])),
    "swin_t": ("vit", 768, _swin_maps(96)),
    "swin_p": ("vit", 384, _swin_maps(48)),
    "swin_n": ("vit", 512, _swin_maps(64)),
    "vit_s": ("vit", 384, [(197, 384)] * 4),
    "deit_t": ("vit", 192, [(197, 192)] * 4),
    "resmlp_s12": ("mlp", 384, [(196, 384)] * 4),
}


def _extra_millions(name, student, teacher, **fields):
    method = _method(name, student, teacher, **fields)
    shapes = jax.eval_shape(lambda: _init(method, student, teacher))
    # Trainable parameters only: BN running statistics are buffers, as in the papers' counts.
    return round(_count(shapes["params"]) / 1e6, 2)


def _check_figures(spec_of):
    for teacher, student, classes, expansion, ofa_m, rsd_m in FIGURES:
        s_spec, t_spec = spec_of(student, classes), spec_of(teacher, classes)
        assert _extra_millions("ofa", s_spec, t_spec) == ofa_m, (teacher, student, classes)
        assert _extra_millions("rsd", s_spec, t_spec, expansion=expansion) == rsd_m, (
            teacher, student, classes)


def test_extra_parameters_match_the_papers_with_hand_written_dims():
    _check_figures(lambda alias, classes: _spec(alias, *HAND_WRITTEN[alias][:1], classes,
                                                *HAND_WRITTEN[alias][1:]))


@pytest.fixture(scope="module")
def registry_spec():
    """ModelSpecs of the registered models at 224 px, built as the trainer builds them."""
    cache = {}

    def spec_of(alias, classes):
        if (alias, classes) not in cache:
            handle = build.build_model(ml_collections.ConfigDict(
                {"name": recipes.resolve_model(alias), "overrides": {}}), classes, jnp.float32)
            cache[alias, classes] = build.model_spec(handle, 224)
        return cache[alias, classes]

    return spec_of


def test_extra_parameters_match_the_papers_with_registry_models(registry_spec):
    _check_figures(registry_spec)
    # The registry models have the dims written out above.
    for alias, (family, dim, shapes) in HAND_WRITTEN.items():
        spec = registry_spec(alias, 100)
        assert (spec.token_stages, spec.embed_dim, spec.stage_shapes) == (
            family != "cnn", dim, tuple(shapes))


# --- OFA -------------------------------------------------------------------------------------

def _param_shapes(module, *args, **kwargs):
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))
    return flax.traverse_util.flatten_dict(shapes["params"], sep="/")


def test_ofa_cnn_branches_downsample_to_m_channels():
    student = _spec("res18", "cnn", 100, 512, _maps([64, 128, 256, 512]))
    branches = ofa.OFABranches(student, teacher_dim=768)
    features = [jnp.zeros((2, *s)) for s in student.stage_shapes]
    shapes = {k: v.shape for k, v in _param_shapes(branches, features, train=False).items()}
    # Stage s: 4 - s separable blocks doubling the channels, the last one to m = 768.
    for stage, outs in ((1, (128, 256, 768)), (2, (256, 768)), (3, (768,))):
        ins = (64 << (stage - 1),) + outs[:-1]
        for i, (c_in, c_out) in enumerate(zip(ins, outs)):
            assert shapes[f"stage{stage}/sepconv_{i}/dw1/kernel"] == (3, 3, 1, c_in)
            assert shapes[f"stage{stage}/sepconv_{i}/pw2/kernel"] == (1, 1, c_in, c_out)
        assert f"stage{stage}/sepconv_{len(outs)}/dw1/kernel" not in shapes
    assert shapes["stage4/proj/kernel"] == (1, 1, 512, 768)
    assert shapes["stage4/proj/bias"] == (768,)
    for stage in (1, 2, 3, 4):
        assert shapes[f"stage{stage}/head/kernel"] == (768, 100)
    logits = jax.eval_shape(lambda: branches.init_with_output(
        jax.random.PRNGKey(0), features, train=False)[0])
    assert [x.shape for x in logits] == [(2, 100)] * 4


@pytest.mark.parametrize("student,merges,in_dims", [
    # Swin-P maps 56/28/14/7 -> 3/2/1/0 merges, the first projecting C_s to D_s = 384.
    (_spec("swin_p", "vit", 100, 384, _swin_maps(48)), (3, 2, 1, 0), (48, 96, 192, 384)),
    # DeiT-T: 1 class token + 14 x 14 patches -> one merge to 7 x 7.
    (_spec("deit_t", "vit", 100, 192, [(197, 192)] * 4), (1, 1, 1, 1), (192,) * 4),
])
def test_ofa_token_branches_merge_to_7x7_then_vit_blocks(student, merges, in_dims):
    branches = ofa.OFABranches(student, teacher_dim=768)
    features = [jnp.zeros((2, *s)) for s in student.stage_shapes]
    shapes = {k: v.shape for k, v in _param_shapes(branches, features, train=False).items()}
    dim = student.embed_dim
    for stage, num_merges, c_in in zip((1, 2, 3, 4), merges, in_dims):
        for i in range(num_merges):
            assert shapes[f"stage{stage}/merge_{i}/reduction/kernel"] == (
                4 * (c_in if i == 0 else dim), dim)
        assert f"stage{stage}/merge_{num_merges}/reduction/kernel" not in shapes
        blocks = max(4 - stage, 1)
        assert shapes[f"stage{stage}/block_{blocks - 1}/attn/qkv/kernel"] == (dim, 3 * dim)
        assert f"stage{stage}/block_{blocks - 1}/attn/qkv/bias" not in shapes  # no qkv bias
        assert f"stage{stage}/block_{blocks}/attn/qkv/kernel" not in shapes
        assert shapes[f"stage{stage}/head/kernel"] == (dim, 100)


def _layer_norm(x, scale, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def test_patch_merging_matches_the_official_order():
    x = np.random.RandomState(0).randn(2, 16, 3).astype(np.float32)
    module = ofa.PatchMerging(out_dim=5, gelu=False)
    variables = module.init(jax.random.PRNGKey(0), x)
    p = variables["params"]
    grid = x.reshape(2, 4, 4, 3)
    # timm's PatchMerging concatenates [0::2, 0::2], [1::2, 0::2], [0::2, 1::2], [1::2, 1::2].
    merged = np.concatenate([grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2],
                             grid[:, 1::2, 1::2]], -1).reshape(2, 4, 12)
    expected = _layer_norm(merged, np.asarray(p["norm"]["scale"]),
                           np.asarray(p["norm"]["bias"])) @ np.asarray(p["reduction"]["kernel"])
    np.testing.assert_allclose(module.apply(variables, x), expected, rtol=1e-5, atol=1e-5)


def test_token_branch_keeps_the_class_token_out_of_the_merging_and_classifies_it():
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, 1 + 16 * 16, 8), jnp.float32)  # 16 x 16 grid: one merge
    branch = ofa.TokenBranch(stage=3, dim=8, num_classes=5, num_prefix=1)
    variables = jax.jit(lambda: branch.init(jax.random.PRNGKey(0), x, train=False))()
    p = variables["params"]
    merged = _apply(ofa.PatchMerging(8, gelu=True), {"params": p["merge_0"]}, x[:, 1:])
    tokens = _apply(ofa.BranchBlock(8), {"params": p["block_0"]},
                    jnp.concatenate([x[:, :1], merged], 1))
    expected = tokens[:, 0] @ p["head"]["kernel"] + p["head"]["bias"]
    np.testing.assert_allclose(_apply(branch, variables, x, train=False), expected, rtol=1e-5,
                               atol=1e-6)


CNN_STUDENT = _spec("cnn_s", "cnn", 10, 128, _maps([16, 32, 64, 128], side=8))
TOKEN_TEACHER = _spec("tok_t", "vit", 10, 64, [(17, 64)] * 4)


def test_ofa_total_is_ce_plus_final_and_branch_ofa_and_branches_train_only_on_their_own():
    fields = {"eps": 1.5, "branch_eps": (1.0, 1.2, 1.4, 1.6), "kd_weight": 0.7,
              "ofa_weight": 0.5}
    method = _method("ofa", CNN_STUDENT, TOKEN_TEACHER, **fields)
    variables = _random_variables(method, CNN_STUDENT, TOKEN_TEACHER)
    out_s, out_t = _outputs(CNN_STUDENT, 3), _outputs(TOKEN_TEACHER, 4)
    batch = _batch(10)
    (loss, metrics), _ = _apply_method(method, variables, out_s, out_t, batch, train=True,
                                mutable=["batch_stats"])
    branch_logits, _ = _apply(
        ofa.OFABranches(CNN_STUDENT, 64),
        {"params": variables["params"]["branches"],
         "batch_stats": variables["batch_stats"]["branches"]},
        out_s[1]["stages"], train=True, mutable=["batch_stats"])
    labels = batch["label"]
    parts = [losses.ofa_loss(b, out_t[0], labels, eps=e)
             for b, e in zip(branch_logits, fields["branch_eps"])]
    ce = losses.cross_entropy(out_s[0], labels, label_smoothing=0.1)
    kd = losses.ofa_loss(out_s[0], out_t[0], labels, eps=1.5)
    chex.assert_trees_all_close(
        (loss, metrics["ofa_stage3"]),
        (ce + 0.7 * kd + 0.5 * sum(parts), parts[2]), rtol=1e-5)

    def loss_of(params, stages, term):
        (total, metrics), _ = apply_method(
            method, {**variables, "params": params}, (out_s[0], {**out_s[1], "stages": stages}), out_t,
            batch, train=True, mutable=["batch_stats"])
        return total if term is None else metrics[term]

    grads = jax.jit(lambda params, stages: [
        jax.grad(loss_of, argnums=(0, 1))(params, stages, term) for term in (None, "ofa_stage2")])
    grad_total, grad_own = grads(variables["params"], out_s[1]["stages"])
    # Branch 2's parameters get exactly ofa_weight * the gradient of its own loss ...
    chex.assert_trees_all_close(grad_total[0]["branches"]["stage2"],
                                jax.tree.map(lambda g: 0.5 * g,
                                             grad_own[0]["branches"]["stage2"]), rtol=1e-4,
                                atol=1e-8)
    # ... and that loss reaches the student's stage-2 feature (the input is not detached),
    # which no other term touches.
    assert float(jnp.abs(grad_own[1][1]).max()) > 0
    np.testing.assert_allclose(grad_total[1][1], 0.5 * grad_own[1][1], rtol=1e-4, atol=1e-9)
    assert float(jnp.abs(grad_own[0]["branches"]["stage3"]["head"]["kernel"]).max()) == 0


def test_ofa_refuses_bad_stage_settings():
    with pytest.raises(ConfigError, match="stages"):
        _method("ofa", CNN_STUDENT, TOKEN_TEACHER, stages=(0, 2))
    with pytest.raises(ConfigError, match="branch_eps"):
        _method("ofa", CNN_STUDENT, TOKEN_TEACHER, stages=(2, 4), branch_eps=(1.0, 1.0, 1.0))
    # A token stage below 14x14 is not merged, so it must already have the branch width (ViP-S/7
    # at 112 px: stage 1 is 16x16 and merged once, stages 2-4 are 8x8 at the final width).
    vip = _spec("vip", "mlp", 10, 384, [(256, 192), (64, 384), (64, 384), (64, 384)])
    _method("ofa", vip, TOKEN_TEACHER)
    narrow = _spec("vip", "mlp", 10, 384, [(256, 192), (64, 192), (64, 384), (64, 384)])
    with pytest.raises(ConfigError, match="stage 2 has width 192 on a 8x8 grid"):
        _method("ofa", narrow, TOKEN_TEACHER)
    _method("ofa", narrow, TOKEN_TEACHER, stages=(1, 3, 4))
    odd = _spec("odd", "vit", 10, 384, [(15 * 15, 384)] * 4)
    with pytest.raises(ConfigError, match="15x15 grid, which is odd"):
        _method("ofa", odd, TOKEN_TEACHER)


def test_ofa_selected_stages_only():
    method = _method("ofa", CNN_STUDENT, TOKEN_TEACHER, stages=(2, 4))
    variables = jax.eval_shape(lambda: _init(method, CNN_STUDENT, TOKEN_TEACHER))
    assert sorted(variables["params"]["branches"]) == ["stage2", "stage4"]


# --- RSD variants ----------------------------------------------------------------------------

def test_rsd_on_logits_maps_student_logits_to_teacher_logits():
    student = _spec("s", "vit", 10, 6, [(17, 6)] * 4)
    method = _method("rsd", student, TOKEN_TEACHER, target="logits", expansion=3.0,
                     stats_groups=2)
    variables = _init(method, student, TOKEN_TEACHER)
    kernels = flax.traverse_util.flatten_dict(variables["params"]["aad"], sep="/")
    assert kernels["Dense_0/kernel"].shape == (10, 30)
    assert kernels["Dense_1/kernel"].shape == (30, 10)
    out_s, out_t = _outputs(student, 3), _outputs(TOKEN_TEACHER, 4)
    (loss, metrics), _ = _apply_method(method, variables, out_s, out_t, _batch(10), train=True,
                                mutable=["batch_stats"])
    projected, _ = rsd.AAD(30, 10).apply(
        {"params": variables["params"]["aad"], "batch_stats": variables["batch_stats"]["aad"]},
        out_s[0], train=True, mutable=["batch_stats"])
    expected = losses.rsd_loss_grouped(projected, out_t[0], 2)
    ce = losses.cross_entropy(out_s[0], _batch(10)["label"], label_smoothing=0.1)
    chex.assert_trees_all_close((metrics["rsd"], loss), (expected, ce + 0.1 * expected),
                                rtol=1e-5)
    with pytest.raises(ConfigError, match="target"):
        _method("rsd", student, TOKEN_TEACHER, target="stages")


def test_rsd_ofa_is_rsd_plus_the_ofa_branches():
    fields = {"rsd_weight": 0.2, "ofa_weight": 0.3, "eps": 1.2, "stages": (1, 3)}
    method = _method("rsd_ofa", CNN_STUDENT, TOKEN_TEACHER, **fields)
    variables = _random_variables(method, CNN_STUDENT, TOKEN_TEACHER)
    out_s, out_t = _outputs(CNN_STUDENT, 3), _outputs(TOKEN_TEACHER, 4)
    batch = _batch(10)
    (loss, metrics), _ = _apply_method(method, variables, out_s, out_t, batch, train=True,
                                mutable=["batch_stats"])
    rsd_only = _method("rsd", CNN_STUDENT, TOKEN_TEACHER, rsd_weight=0.2)
    (rsd_loss, rsd_metrics), _ = _apply_method(
        rsd_only,
        {"params": {"aad": variables["params"]["aad"]},
         "batch_stats": {"aad": variables["batch_stats"]["aad"]}},
        out_s, out_t, batch, train=True, mutable=["batch_stats"])
    branch_logits, _ = _apply(
        ofa.OFABranches(CNN_STUDENT, 64, (1, 3)),
        {"params": variables["params"]["branches"],
         "batch_stats": variables["batch_stats"]["branches"]},
        out_s[1]["stages"], train=True, mutable=["batch_stats"])
    branches = sum(losses.ofa_loss(b, out_t[0], batch["label"], eps=1.2) for b in branch_logits)
    chex.assert_trees_all_close((loss, metrics["rsd"]),
                                (rsd_loss + 0.3 * branches, rsd_metrics["rsd"]), rtol=1e-5)


# --- DKD, DIST -------------------------------------------------------------------------------

def test_dkd_weight_warms_up_linearly_over_training_steps():
    method = _method("dkd", CNN_STUDENT, TOKEN_TEACHER, alpha=1.0, beta=8.0, temperature=4.0,
                     warmup_steps=4)
    variables = _init(method, CNN_STUDENT, TOKEN_TEACHER)
    out_s, out_t, batch = _outputs(CNN_STUDENT, 3), _outputs(TOKEN_TEACHER, 4), _batch(10)
    dkd = losses.dkd_loss(out_s[0], out_t[0], batch["label"], alpha=1.0, beta=8.0,
                          temperature=4.0)
    ce = losses.cross_entropy(out_s[0], batch["label"], label_smoothing=0.1)
    (loss, _), _ = apply_method(method, variables, out_s, out_t, batch, train=False,
                                mutable=True)
    np.testing.assert_allclose(loss, ce + 0.25 * dkd, rtol=1e-5)  # eval: no step taken
    for step in range(1, 7):
        (loss, metrics), state = apply_method(method, variables, out_s, out_t, batch,
                                              train=True, mutable=["counters"])
        variables = {**variables, **state}
        weight = min(step / 4, 1.0)
        chex.assert_trees_all_close((loss, metrics["dkd_weight"], metrics["dkd"]),
                                    (ce + weight * dkd, jnp.float32(weight), dkd), rtol=1e-5)


def test_dist_total_is_ce_plus_weighted_dist():
    method = _method("dist", CNN_STUDENT, TOKEN_TEACHER, beta=2.0, gamma=0.5, temperature=3.0,
                     kd_weight=0.4)
    out_s, out_t, batch = _outputs(CNN_STUDENT, 3), _outputs(TOKEN_TEACHER, 4), _batch(10)
    loss, metrics = apply_method(method, {}, out_s, out_t, batch, train=True)
    dist = losses.dist_loss(out_s[0], out_t[0], beta=2.0, gamma=0.5, temperature=3.0)
    ce = losses.cross_entropy(out_s[0], batch["label"], label_smoothing=0.1)
    chex.assert_trees_all_close((loss, metrics["dist"]), (ce + 0.4 * dist, dist), rtol=1e-5)


# --- FitNet ----------------------------------------------------------------------------------

def test_unpatchify_puts_channel_blocks_on_their_patch_pixels():
    x = np.random.RandomState(0).randn(2, 3, 3, 2 * 2 * 5).astype(np.float32)
    expected = np.zeros((2, 6, 6, 5), np.float32)
    for i in range(3):
        for j in range(3):
            for p in range(2):
                for q in range(2):
                    block = (p * 2 + q) * 5
                    expected[:, i * 2 + p, j * 2 + q] = x[:, i, j, block:block + 5]
    np.testing.assert_array_equal(fitnet.unpatchify(jnp.asarray(x), 2), expected)


def _aligned_reference(grid, kernel, teacher_grid):
    """The adapter written out in NumPy: strided r x r conv, or 1x1 conv then unpatchify."""
    batch, side, _, channels = grid.shape
    if side >= teacher_grid:
        r = side // teacher_grid
        patches = grid.reshape(batch, teacher_grid, r, teacher_grid, r, channels)
        return np.einsum("bipjqc,pqco->bijo", patches, kernel)
    r = teacher_grid // side
    out = np.einsum("bijc,co->bijo", grid, kernel[0, 0])
    result = np.zeros((batch, teacher_grid, teacher_grid, out.shape[-1] // (r * r)), np.float32)
    for p in range(r):
        for q in range(r):
            c = result.shape[-1]
            result[:, p::r, q::r] = out[..., (p * r + q) * c:(p * r + q + 1) * c]
    return result


@pytest.mark.parametrize("student,teacher", [
    (CNN_STUDENT, TOKEN_TEACHER),  # maps 8/4/2/1 -> 4 x 4 tokens after a class token
    (TOKEN_TEACHER, CNN_STUDENT),  # tokens -> maps (merging and unpatchify)
    (_spec("mix", "mlp", 10, 24, [(16, 24)] * 4), TOKEN_TEACHER),  # tokens -> tokens
])
def test_fitnet_total_is_ce_plus_weighted_mse_of_aligned_stages(student, teacher):
    method = _method("fitnet", student, teacher, fitnet_weight=0.3)
    variables = _random_variables(method, student, teacher)
    out_s, out_t, batch = _outputs(student, 3), _outputs(teacher, 4), _batch(10)
    loss, metrics = _apply_method(method, variables, out_s, out_t, batch, train=True)
    mses = []
    for k in range(4):
        s_prefix, t_prefix = (ofa.token_layout(spec.stage_shapes[k])[0]
                              for spec in (student, teacher))
        s_grid = np.asarray(fitnet.as_grid(out_s[1]["stages"][k], s_prefix))
        t_grid = np.asarray(fitnet.as_grid(out_t[1]["stages"][k], t_prefix))
        kernel = np.asarray(variables["params"][f"stage{k + 1}"]["proj"]["kernel"])
        aligned = _aligned_reference(s_grid, kernel, t_grid.shape[1])
        mses.append(np.mean((aligned - t_grid) ** 2))
    ce = losses.cross_entropy(out_s[0], batch["label"], label_smoothing=0.1)
    chex.assert_trees_all_close((loss, metrics["fitnet_stage2"]),
                                (ce + 0.3 * sum(mses), mses[1]), rtol=1e-4)


def test_fitnet_refuses_grids_without_an_integer_ratio():
    odd = _spec("odd", "vit", 10, 8, [(1 + 36, 8)] * 4)  # 6 x 6 against 8/4/2/1 maps
    with pytest.raises(ConfigError, match="integer ratio"):
        _method("fitnet", odd, CNN_STUDENT, stages=(1,))


# --- CRD -------------------------------------------------------------------------------------

def _nce_reference(scores, num_data):
    """The official ContrastLoss in float64 NumPy."""
    scores = np.asarray(scores, np.float64)
    m, pn, eps = scores.shape[1] - 1, 1.0 / num_data, 1e-7
    log_d1 = np.log(scores[:, 0] / (scores[:, 0] + m * pn + eps))
    log_d0 = np.log(m * pn / (scores[:, 1:] + m * pn + eps))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


def _unit_rows(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_crd_scores_memory_updates_and_normalisation_constants():
    method = _method("crd", CNN_STUDENT, TOKEN_TEACHER, num_negatives=12, kd_weight=0.6)
    variables = _init(method, CNN_STUDENT, TOKEN_TEACHER)
    memory = variables["memory"]
    assert memory["student"].shape == memory["teacher"].shape == (50, 128)
    bound = 1 / math.sqrt(128 / 3)
    assert float(jnp.abs(memory["student"]).max()) <= bound and float(memory["z_student"]) < 0
    out_s, out_t, batch = _outputs(CNN_STUDENT, 3), _outputs(TOKEN_TEACHER, 4), _batch(10)
    params = variables["params"]
    f_s = _unit_rows(np.asarray(out_s[1]["embedding"]) @ np.asarray(
        params["embed_student"]["linear"]["kernel"]) + np.asarray(
        params["embed_student"]["linear"]["bias"]))
    f_t = _unit_rows(np.asarray(out_t[1]["embedding"]) @ np.asarray(
        params["embed_teacher"]["linear"]["kernel"]) + np.asarray(
        params["embed_teacher"]["linear"]["bias"]))
    index = np.asarray(batch["index"])
    z = {}
    for step in range(2):
        (loss, metrics), state = _apply_method(
            method, variables, out_s, out_t, batch, train=True,
            rngs={"dropout": jax.random.PRNGKey(step)}, mutable=["memory", "intermediates"],
            capture_intermediates=lambda module, _: isinstance(module, crd.ContrastIndices))
        rows = np.asarray(state["intermediates"]["negatives"]["__call__"][0])
        assert rows.shape == (BATCH, 13) and (rows[:, 0] == index).all()
        old_s, old_t = (np.asarray(variables["memory"][k]) for k in ("student", "teacher"))
        exp_s = np.exp(np.einsum("bkd,bd->bk", old_t[rows], f_s) / 0.07)
        exp_t = np.exp(np.einsum("bkd,bd->bk", old_s[rows], f_t) / 0.07)
        if step == 0:  # Z is set once, from the first training batch, then kept
            z = {"student": exp_s.mean() * 50, "teacher": exp_t.mean() * 50}
        for side in ("student", "teacher"):
            np.testing.assert_allclose(state["memory"][f"z_{side}"], z[side], rtol=1e-4)
        nce_s, nce_t = (_nce_reference(exp_s / z["student"], 50),
                        _nce_reference(exp_t / z["teacher"], 50))
        ce = losses.cross_entropy(out_s[0], batch["label"], label_smoothing=0.1)
        np.testing.assert_allclose([metrics["crd_student"], metrics["crd_teacher"], loss],
                                   [nce_s, nce_t, ce + 0.6 * (nce_s + nce_t)], rtol=1e-4)
        # The batch's rows move halfway to the new embeddings and are renormalised; the
        # other rows stay.
        for side, old, f in (("student", old_s, f_s), ("teacher", old_t, f_t)):
            new = np.asarray(state["memory"][side])
            np.testing.assert_allclose(new[index], _unit_rows(0.5 * old[index] + 0.5 * f),
                                       rtol=1e-5, atol=1e-6)
            untouched = np.setdiff1d(np.arange(50), index)
            np.testing.assert_array_equal(new[untouched], old[untouched])
        variables = {**variables, "memory": state["memory"]}


def test_crd_needs_the_train_set_size():
    ctx = distill.MethodContext(num_devices=1, label_smoothing=0.0)
    with pytest.raises(ConfigError, match="num_train_examples"):
        _method("crd", CNN_STUDENT, TOKEN_TEACHER, ctx=ctx)
    ctx = distill.MethodContext(num_devices=1, label_smoothing=0.0, num_train_examples=50)
    with pytest.raises(ConfigError, match="train_labels"):
        _method("crd", CNN_STUDENT, TOKEN_TEACHER, ctx=ctx)
    _method("crd", CNN_STUDENT, TOKEN_TEACHER, ctx=ctx, negatives="uniform")  # needs none
    with pytest.raises(ConfigError, match="negatives"):
        _method("crd", CNN_STUDENT, TOKEN_TEACHER, negatives="hard")


@pytest.mark.parametrize("labels", [np.arange(60) % 3, np.repeat([0, 1, 2, 3], [1, 5, 30, 4])],
                         ids=["balanced", "skewed"])
def test_crd_negatives_come_from_other_classes_uniformly(labels):
    groups = {k: jnp.asarray(v) for k, v in crd.class_groups(labels).items()}
    index = jnp.arange(len(labels), dtype=jnp.int32)
    draws = np.asarray(jax.jit(crd.other_class_draw, static_argnums=3)(
        jax.random.PRNGKey(0), groups, index, 4000))
    assert draws.shape == (len(labels), 4000)
    assert not np.any(labels[draws] == labels[:, None])  # no negative shares the class
    # Uniform over the other classes' examples: each allowed example about equally often.
    anchor = int(np.argmax(labels == 2))  # class 2 is the largest class in the skewed case
    allowed = np.flatnonzero(labels != labels[anchor])
    counts = np.bincount(draws[anchor], minlength=len(labels))[allowed]
    expected = 4000 / len(allowed)
    assert counts.min() > 0.5 * expected and counts.max() < 1.6 * expected
    assert set(np.unique(draws[anchor])) == set(allowed)


# --- end to end on the digits ----------------------------------------------------------------

# (method, student kind, teacher kind, method fields, metrics each step must report)
RUNS = [
    # Two CNN branches (a separable block with BN statistics, the 1x1 conv) and one token
    # branch keep the compilation short; the unit tests above cover all four of each.
    ("ofa", "cnn", "vit", {"stages": (3, 4)}, ["ce", "kd", "ofa", "ofa_stage3", "ofa_stage4"]),
    ("rsd_ofa", "vit", "vit", {"stages": (4,)}, ["ce", "rsd", "ofa", "ofa_stage4"]),
    ("fitnet", "vit", "cnn", {}, ["ce", "fitnet", "fitnet_stage1", "fitnet_stage4"]),
    ("dkd", "vit", "vit", {"warmup_steps": 2}, ["ce", "dkd", "dkd_weight"]),
    ("dist", "vit", "vit", {}, ["ce", "dist"]),
    ("crd", "vit", "vit", {"num_negatives": 64}, ["ce", "crd", "crd_student", "crd_teacher"]),
]


@pytest.mark.parametrize("method,student,teacher,fields,reported", RUNS,
                         ids=[r[0] for r in RUNS])
def test_method_distills_end_to_end(tmp_path, digits_dir, teachers, method, student, teacher,
                                    fields, reported):
    config, result, steps = distil_two_steps(tmp_path, digits_dir, teachers, method, student,
                                             teacher, **fields)
    assert 0.0 <= result["eval/top1"] <= 100.0
    for m in steps:
        assert all(np.isfinite(m[f"train/{k}"]) for k in ["loss", *reported])
    if method == "dkd":
        assert [m["train/dkd_weight"] for m in steps] == [0.5, 1.0]
    if method == "crd":  # the memory banks are carried in the train state and checkpointed
        setup, _ = step.build(config, 10, 89, 2, sharding.data_mesh(),
                              num_train_examples=1437, train_labels=np.arange(1437) % 10)
        ckpt = checkpoint.TrainCheckpointer(str(tmp_path))
        state = ckpt.restore(2, step.abstract_state(setup), run_config.run_metadata(config, 10))
        ckpt.close()
        memory = state.model_state["method"]["memory"]
        initial = step.init_state(setup, config.seed).model_state["method"]["memory"]
        for side in ("student", "teacher"):
            assert memory[side].shape == (1437, 128)  # the digits train split
            changed = np.any(np.asarray(memory[side]) != np.asarray(initial[side]), axis=1)
            assert int(changed.sum()) == 2 * 16  # the rows of the two batches' examples
        assert float(memory["z_student"]) > 0 and float(memory["z_teacher"]) > 0
    # The export is the student alone: the method's modules (branches, adapters) are dropped.
    variables, meta = checkpoint.load_model(str(tmp_path / "export"))
    module = models.create_model(config.student.name, num_classes=10,
                                 **dict(config.student.overrides))
    expected = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0),
                                                  jnp.zeros((1, 16, 16, 3)), train=False))
    assert meta["model_name"] == config.student.name
    assert (set(flax.traverse_util.flatten_dict(variables, sep="/")) ==
            set(flax.traverse_util.flatten_dict(expected, sep="/")))
    assert os.path.isdir(tmp_path / "export")
