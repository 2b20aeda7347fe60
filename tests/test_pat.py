"""PAT: module shapes for every family pair, the parts that fix the official code's bugs, the
loss as the sum of its parts, a frozen teacher, and the feedback carried in the train state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxkd import checkpoint, distill, run_config, sharding, step, train
from jaxkd.distill import pat

from helpers import apply_method, init_method, random_teacher, tiny_config

BATCH = 4
CTX = distill.MethodContext(num_devices=1, label_smoothing=0.1)


def _maps(channels, side=56):
    return [(side >> i, side >> i, c) for i, c in enumerate(channels)]


# 224 px: (family, stage outputs, stage inputs as the models' pre_stage hook sees them).
FAMILIES = {
    "res18": ("cnn", _maps([64, 128, 256, 512]), [(56, 56, 64)] + _maps([64, 128, 256])[:3]),
    "convnext_t": ("cnn", _maps([96, 192, 384, 768]), [(56, 56, 96)] + _maps([96, 192, 384])),
    # Swin is prompted after each stage's patch merging: its inputs are its outputs' shapes.
    "swin_t": ("vit", _maps([96, 192, 384, 768]), _maps([96, 192, 384, 768])),
    "vit_s": ("vit", [(197, 384)] * 4, [(197, 384)] * 4),
    "mixer_b16": ("mlp", [(196, 768)] * 4, [(196, 768)] * 4),
}


def _spec(name, num_classes=100):
    family, stages, _ = FAMILIES[name]
    return distill.ModelSpec(name=name, num_classes=num_classes, embed_dim=stages[-1][-1],
                             stage_shapes=tuple(map(tuple, stages)),
                             token_stages=family != "cnn")


def _stand_in_teacher(name, calls):
    """A teacher_forward whose stage k output has the real shape and depends on what the
    prompt made of stage k's input; records the prompted inputs in `calls`."""
    _, stages, inputs = FAMILIES[name]

    def forward(pre_stage):
        outs = []
        for i, (inp, out) in enumerate(zip(inputs, stages)):
            prompted = pre_stage(i, jnp.ones((BATCH, *inp)))
            calls.append((inp, prompted.shape))
            outs.append(jnp.zeros((BATCH, *out)) + jnp.mean(prompted))
        return jnp.zeros((BATCH, 100)) + jnp.mean(outs[-1]), {"stages": outs}

    return forward


def _outputs(spec, batch=BATCH):
    return (jnp.zeros((batch, spec.num_classes)),
            {"embedding": jnp.zeros((batch, spec.embed_dim)),
             "stages": [jnp.zeros((batch, *s)) for s in spec.stage_shapes]})


@pytest.mark.parametrize("teacher", sorted(FAMILIES))
@pytest.mark.parametrize("student", ["res18", "swin_t", "vit_s", "mixer_b16"])
def test_module_shapes_for_every_family_pair(student, teacher):
    s_spec, t_spec = _spec(student), _spec(teacher)
    method = distill.create_method(distill.method_config("pat"), s_spec, t_spec, CTX)
    calls = []
    batch = {"label": jnp.zeros((BATCH,), jnp.int32), "index": jnp.zeros((BATCH,), jnp.int32)}
    shapes = jax.eval_shape(lambda: init_method(
        method, jax.random.PRNGKey(0), _outputs(s_spec), _outputs(t_spec), batch, train=False,
        teacher_forward=_stand_in_teacher(teacher, calls)))
    # Every prompt returns its stage input's shape (a ViT's class token included).
    assert [inp for inp, _ in calls] == list(FAMILIES[teacher][2])
    assert all(shape == (BATCH, *inp) for inp, shape in calls)
    params = shapes["params"]
    for i in range(4):  # RAA: 16 tokens of width 512 per student stage
        assert params["raa"][f"stage_tokens_{i}"]["proj"]["kernel"].shape[-1] == 512
    for i, (stage, inp) in enumerate(zip(*FAMILIES[teacher][1:])):
        grid = pat._grid_shape(stage)
        feedback = shapes[distill.PER_EXAMPLE_COLLECTION][f"feedback_{i}"]
        assert feedback.shape == (BATCH, *grid)
        prompt = params[f"prompt_{i}"]
        # The feedback is aligned by a 1x1 conv exactly when its shape differs from the input's.
        assert ("feedback_align" in prompt) == (grid != pat._grid_shape(inp))
        align = params[f"align_{i}"]
        if FAMILIES[teacher][0] == "cnn":
            assert align["proj"]["kernel"].shape == (1, 1, 512, stage[-1])
        else:
            assert align["proj_channels"]["kernel"].shape == (512, stage[-1])
            assert align["proj_tokens"]["kernel"].shape == (16, grid[0] * grid[1])
    assert shapes[distill.PER_EXAMPLE_COLLECTION]["has_feedback"].shape == (BATCH,)


def test_real_vit_teacher_prompts_its_patch_tokens(tmp_path):
    """With a real (tiny) DeiT teacher: 17 tokens per stage input, 4 x 4 patch grids prompted."""
    config = tiny_config("pat", teacher_checkpoint=random_teacher(str(tmp_path), 10), steps=1)
    config.student.name, config.student.overrides = "resnet18", {"layers": [1, 1, 1, 1]}
    setup, _ = step.build(config, 10, 1, 1, sharding.data_mesh())
    state = step.abstract_state(setup)  # traced through the real teacher's pre_stage hook
    per_example = state.model_state["method"][distill.PER_EXAMPLE_COLLECTION]
    assert [per_example[f"feedback_{i}"].shape for i in range(4)] == [(16, 4, 4, 32)] * 4
    params = state.params["method"]
    assert all("feedback_align" not in params[f"prompt_{i}"] for i in range(4))
    assert params["align_3"]["proj_tokens"]["kernel"].shape == (16, 16)  # 16 patch tokens


def _extra_parameters(student, teacher):
    method = distill.create_method(distill.method_config("pat"), student, _spec(teacher), CTX)
    batch = {"label": jnp.zeros((BATCH,), jnp.int32), "index": jnp.zeros((BATCH,), jnp.int32)}
    shapes = jax.eval_shape(lambda: init_method(
        method, jax.random.PRNGKey(0), _outputs(student), _outputs(_spec(teacher)), batch,
        train=False, teacher_forward=_stand_in_teacher(teacher, [])))
    return {part: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
        {k: v for k, v in shapes["params"].items() if k.startswith(part)}))
        for part in ("raa", "align", "prompt")}


def test_extra_parameters_match_the_paper():
    """14.48M (PAT paper, ConvNeXt-T -> DeiT-T on CIFAR-100): RAA, aligners, prompt blocks."""
    student = distill.ModelSpec("deit_t", 100, 192, ((197, 192),) * 4, token_stages=True)
    count = sum(_extra_parameters(student, "convnext_t").values())
    assert count == 14_475_236 and round(count / 1e6, 2) == 14.48


def test_extra_parameters_with_a_swin_teacher_match_the_official_code():
    """Swin-T -> ResNet18 (PAT's main pair): prompts after the patch merging (widths
    96/192/384/768) and token aligners, as the official code counts them."""
    parts = _extra_parameters(_spec("res18"), "swin_t")
    assert parts == {"raa": 13_570_560, "align": 812_533, "prompt": 24_138_904}
    assert sum(parts.values()) == 38_521_997


@pytest.mark.parametrize("size,out", [(7, 56), (14, 16), (3, 4), (56, 28), (5, 5)])
def test_nearest_resize_matches_torch(size, out):
    x = np.random.RandomState(0).randn(2, size, size, 3).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2),
                                               size=(out, out), mode="nearest")
    np.testing.assert_array_equal(np.asarray(pat.nearest_resize(jnp.asarray(x), out, out)),
                                  expected.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("side", [56, 14, 7, 4, 2])
def test_stage_tokens_are_a_patch_embedding_of_the_resized_grid(side):
    """As timm's PatchEmbed (kernel = stride = ceil(side / 4), no padding) after a nearest
    resize to 4 * ceil(side / 4): 16 tokens, row-major."""
    x = np.random.RandomState(0).randn(2, side, side, 6).astype(np.float32)
    module = pat.StageTokens(dim=8)
    variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x))
    tokens = module.apply(variables, jnp.asarray(x))
    patch = -(-side // 4)
    kernel = variables["params"]["proj"]["kernel"]
    conv = torch.nn.Conv2d(6, 8, patch, stride=patch)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(np.asarray(kernel).transpose(3, 2, 0, 1)))
        conv.bias.copy_(torch.tensor(np.asarray(variables["params"]["proj"]["bias"])))
        resized = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2),
                                                  size=4 * patch, mode="nearest")
        expected = conv(resized).flatten(2).transpose(1, 2).numpy()
    np.testing.assert_allclose(tokens, expected, rtol=1e-5, atol=1e-5)


def test_position_encoding_is_per_token():
    encoding = pat.sinusoidal_encoding(64, 512)
    i, position = np.arange(0, 512, 2), 5
    np.testing.assert_allclose(encoding[position, 0::2],
                               np.sin(position / 10000 ** (i / 512)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(encoding[position, 1::2],
                               np.cos(position / 10000 ** (i / 512)), rtol=1e-5, atol=1e-6)
    # Identical tokens at different positions come out different (a batch-indexed encoding,
    # the official bug, adds the same vector to every token and leaves them identical).
    raa = pat.RegionAwareAttention(num_stages=2, dim=32, heads=4)
    grids = [jnp.ones((2, 8, 8, 6)), jnp.ones((2, 4, 4, 6))]
    variables = raa.init(jax.random.PRNGKey(0), grids)
    first, second = raa.apply(variables, grids)
    assert first.shape == second.shape == (2, 16, 32)
    assert not np.allclose(first[:, 0], first[:, 1])
    np.testing.assert_allclose(first[0], first[1])  # and nothing mixes the batch


def test_squeeze_excite_scales_its_input_by_the_gate():
    se = pat.SqueezeExcite()
    x = jnp.asarray(np.random.RandomState(0).randn(2, 5, 5, 32), jnp.float32)
    variables = se.init(jax.random.PRNGKey(0), x)
    p = variables["params"]
    squeezed = x.mean(axis=(1, 2))
    hidden = jax.nn.relu(squeezed @ p["compress"]["kernel"][0, 0] + p["compress"]["bias"])
    gate = jax.nn.sigmoid(hidden @ p["excitation"]["kernel"][0, 0] + p["excitation"]["bias"])
    np.testing.assert_allclose(se.apply(variables, x), x * gate[:, None, None, :], rtol=1e-5,
                               atol=1e-6)
    # The official code's block (se_gate_only): the gate alone, constant over space.
    official = pat.SqueezeExcite(gate_only=True).apply(variables, x)
    np.testing.assert_allclose(official, jnp.broadcast_to(gate[:, None, None, :], x.shape),
                               rtol=1e-5, atol=1e-6)


def test_prompt_block_starts_as_identity_and_uses_feedback_only_when_present():
    block = pat.PromptBlock()
    rng = np.random.RandomState(0)
    grid = jnp.asarray(rng.randn(2, 8, 8, 16), jnp.float32)
    feedback = jnp.asarray(rng.randn(2, 4, 4, 32), jnp.float32)
    none, present = jnp.zeros((2,)), jnp.ones((2,))
    variables = block.init(jax.random.PRNGKey(0), grid, feedback, none, train=False)
    assert variables["params"]["beta"].shape == ()
    run = lambda v, fb, has: block.apply(v, grid, fb, has, train=False)  # noqa: E731
    np.testing.assert_array_equal(run(variables, feedback, present), grid)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.full_like(v, 0.5) if path[-1].key == "beta" else v, variables)
    without = run(variables, feedback, none)
    assert not np.allclose(without, grid)
    np.testing.assert_array_equal(run(variables, 3 * feedback, none), without)
    with_feedback = run(variables, feedback, present)
    assert not np.allclose(with_feedback, without)
    mixed = run(variables, feedback, jnp.asarray([1.0, 0.0]))
    np.testing.assert_allclose(mixed[0], with_feedback[0], rtol=1e-6)
    np.testing.assert_allclose(mixed[1], without[1], rtol=1e-6)


def test_class_token_stays_out_of_the_prompt():
    tokens = jnp.asarray(np.random.RandomState(0).randn(2, 17, 8), jnp.float32)
    prefix, grid = pat.split_grid(tokens)
    assert prefix.shape == (2, 1, 8) and grid.shape == (2, 4, 4, 8)
    np.testing.assert_array_equal(grid[:, 0, 0], tokens[:, 1])  # the first patch token
    np.testing.assert_array_equal(pat.join_grid(prefix, grid, tokens), tokens)
    changed = pat.join_grid(prefix, grid + 1.0, tokens)
    np.testing.assert_array_equal(changed[:, 0], tokens[:, 0])  # class token untouched
    np.testing.assert_array_equal(changed[:, -1], tokens[:, -1] + 1.0)  # last patch prompted


@pytest.fixture(scope="module")
def cnn_teacher(tmp_path_factory):
    overrides = {"layers": [1, 1, 1, 1]}
    path = random_teacher(str(tmp_path_factory.mktemp("teacher")), num_classes=10,
                          name="resnet18", overrides=overrides)
    return path, overrides


def _config(teacher, steps=3, **fields):
    path, overrides = teacher
    config = tiny_config("pat", teacher_checkpoint=path, steps=steps, **fields)
    config.teacher.name, config.teacher.overrides = "resnet18", dict(overrides)
    config.optimizer.lr = 1e-2
    return config


def _setup(teacher, steps=3, **fields):
    """(setup, teacher variables) of a tiny PAT run."""
    return step.build(_config(teacher, steps, **fields), 10, steps, steps, sharding.data_mesh())


def _batches(n, batch_size=16):
    rng = np.random.RandomState(0)
    return [{"image": rng.rand(batch_size, 16, 16, 3).astype(np.float32),
             "label": rng.randint(0, 10, batch_size).astype(np.int32),
             "index": np.arange(batch_size, dtype=np.int32)} for _ in range(n)]


def test_step_trains_prompts_keeps_the_teacher_frozen_and_carries_feedback(cnn_teacher):
    setup, teacher_variables = _setup(cnn_teacher)
    train_step = step.jit_train_step(setup)
    mesh = setup.mesh
    teacher_before = jax.device_get(teacher_variables)
    state = step.init_state(setup, 0)
    per_example = state.model_state["method"][distill.PER_EXAMPLE_COLLECTION]
    assert per_example["has_feedback"].sharding.spec == jax.sharding.PartitionSpec("data")
    assert float(jnp.sum(per_example["has_feedback"])) == 0.0
    batches = [sharding.global_batch(b, mesh) for b in _batches(2)]
    state, metrics = train_step(state, teacher_variables, batches[0])
    total = sum(float(metrics[f"train/{k}"]) for k in ("ce", "kd", "hcl", "prompt_reg"))
    np.testing.assert_allclose(float(metrics["train/loss"]), total, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["train/hcl"]), sum(
        float(metrics[f"train/hcl_stage{i}"]) for i in range(1, 5)), rtol=1e-5)
    per_example = state.model_state["method"][distill.PER_EXAMPLE_COLLECTION]
    assert float(jnp.min(per_example["has_feedback"])) == 1.0
    assert all(float(jnp.abs(per_example[f"feedback_{i}"]).max()) > 0 for i in range(4))
    assert all(float(state.params["method"][f"prompt_{i}"]["beta"]) != 0 for i in range(4))
    state, _ = train_step(state, teacher_variables, batches[1])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(teacher_variables),
                 teacher_before)

    # No gradient reaches the teacher's weights, though the prompted teacher is differentiated:
    # the training loss as a function of the teacher's weights and the parameters.
    def training_loss(teacher_variables, params):
        teacher = step.teacher_view(setup, teacher_variables, batches[1]["image"])
        return step.loss(setup, params, state.model_state, teacher, batches[1],
                         jax.random.PRNGKey(0))[0]

    teacher_grads, grads = jax.jit(jax.grad(training_loss, argnums=(0, 1)))(
        teacher_variables, state.params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(teacher_grads))
    assert float(jnp.abs(grads["method"]["prompt_0"]["prompt_1"]["kernel"]).max()) > 0


def test_prompt_regulariser_is_the_kl_of_prompted_to_plain_teacher_logits(cnn_teacher):
    setup, teacher_variables = _setup(cnn_teacher)
    state = step.init_state(setup, 0)
    batch = sharding.global_batch(_batches(1)[0], setup.mesh)
    images = batch["image"]
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.full_like(v, 10.0) if path[-1].key == "beta" else v,
        state.params["method"])
    student_out = setup.student.module.apply(
        {"params": state.params["student"], **state.model_state["student"]},
        setup.student.normalize(images))
    plain = step.teacher_view(setup, teacher_variables, images)

    def run(params):
        captured = {}

        def prompted_forward(pre_stage):  # the forward PAT runs, kept for the check
            captured["out"] = plain.rerun(pre_stage)
            return captured["out"]

        (_, metrics), _ = apply_method(
            setup.method, {"params": params, **state.model_state["method"]}, student_out,
            plain[:2], batch, train=False, mutable=True, teacher_forward=prompted_forward)
        return metrics, captured["out"][0]

    metrics, prompted_logits = jax.jit(run)(params)
    assert not np.allclose(prompted_logits, plain[0])  # beta = 10 changed the teacher
    # KL(teacher || prompted teacher) in float64; the float32 loss sums terms of size ~log(10),
    # so its rounding error is ~1e-7 absolute.
    np.testing.assert_allclose(float(metrics["prompt_reg"]),
                               _kl64(plain[0], prompted_logits), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics["kd"]), _kl64(plain[0], student_out[0]),
                               rtol=1e-5, atol=1e-7)


def _kl64(target_logits, logits):
    """Batch-mean KL(softmax(target) || softmax(logits)) in float64."""
    def log_softmax(z):
        z = np.asarray(z, np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    log_t, log_s = log_softmax(target_logits), log_softmax(logits)
    return float(np.mean(np.sum(np.exp(log_t) * (log_t - log_s), axis=-1)))


def test_pat_distills_end_to_end_and_resumes_with_its_feedback(tmp_path, cnn_teacher):
    config = _config(cnn_teacher, steps=2)
    config.dataset.data_dir = str(tmp_path / "tfds")
    config.checkpoint_every_steps = 1
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert 0.0 <= result["eval/top1"] <= 100.0
    setup, _ = step.build(config, 10, 89, 2, sharding.data_mesh())
    ckpt = checkpoint.TrainCheckpointer(str(tmp_path / "run"))
    meta = run_config.run_metadata(config, 10)
    restored = {n: ckpt.restore(n, step.abstract_state(setup), meta) for n in (1, 2)}
    ckpt.close()
    feedback = [r.model_state["method"][distill.PER_EXAMPLE_COLLECTION] for r in
                restored.values()]
    assert all(float(jnp.min(f["has_feedback"])) == 1.0 for f in feedback)
    # Each step stored its own batch's feedback.
    assert not np.allclose(feedback[0]["feedback_0"], feedback[1]["feedback_0"])
