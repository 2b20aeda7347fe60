"""OFA-KD's MLP students (the supplement's Figure 5): configs/ofa_imagenet.py and
configs/ce_imagenet.py take each ViT-B -> MLP pair, and each pair distils a tiny version of
its models end to end through the config file's own recipe (ViP and Mixer with token
branches, CycleMLP and HireMLP, whose stages are maps, with CNN branches)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import build, recipes, train
from jaxkd.distill import ofa
from jaxkd.metric_writer import read_metrics

from helpers import random_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 32
TINY_VIT_B = dict(img_size=IMAGE_SIZE, patch_size=8, embed_dim=32, depth=4, num_heads=2)
# Tiny students at 32 px with four stages each; ViP's stages share the branch width, as a
# token branch below a 14 x 14 grid merges nothing.
TINY_STUDENTS = {
    "mixer_b16": dict(img_size=IMAGE_SIZE, patch_size=8, embed_dim=32, num_blocks=4),
    "vip_s7": dict(img_size=IMAGE_SIZE, patch_size=4, layers=(1, 1, 1, 1),
                   embed_dims=(32, 32, 32, 32), transitions=(True, False, False, False),
                   segment_dim=(8, 4, 4, 4), mlp_ratios=(2, 2, 2, 2)),
    "cyclemlp_b3": dict(img_size=IMAGE_SIZE, layers=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32),
                        mlp_ratios=(2, 2, 2, 2)),
    "hiremlp_s": dict(layers=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), mlp_ratios=(2, 2, 2, 2)),
}
# The branch kind OFA gives each student's stages, as the official code decides it.
TOKEN_BRANCHES = {"mixer_b16": True, "vip_s7": True, "cyclemlp_b3": False, "hiremlp_s": False}


def _get_config(name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config, module.__doc__


def test_configs_take_the_mlp_pairs_with_the_vit_mlp_recipe():
    ofa, doc = _get_config("ofa_imagenet")
    scratch, _ = _get_config("ce_imagenet")
    assert "84.08" in doc  # CycleMLP-B3 with OFA-KD, the one value the text gives
    assert {s for _, s in recipes.OFA_MLP_PAIRS} == set(TINY_STUDENTS)
    for teacher, student in recipes.OFA_MLP_PAIRS:
        config = ofa(f"{teacher},{student}")
        assert (config.teacher.name, config.student.name) == (
            "vit_base_patch16_224", recipes.resolve_model(student))
        assert config.method.name == "ofa" and config.method.eps == 1.5
        assert (config.optimizer.name, config.num_epochs, config.ema_decay) == (
            "adamw", 300, 0.99996)
        assert config.augment.randaugment == "rand-m9-mstd0.5-inc1"
        assert scratch(student).student.name == config.student.name
        assert scratch(f"{teacher},{student}").teacher.name == ""
    assert recipes.resolve_model("hiremlp_s") == "hire_mlp_small"


@pytest.fixture(scope="module")
def vit_b_teacher(tmp_path_factory):
    return random_teacher(str(tmp_path_factory.mktemp("vit_b")), 10,
                          name="vit_base_patch16_224", overrides=TINY_VIT_B,
                          image_size=IMAGE_SIZE)


@pytest.mark.parametrize("student", sorted(TINY_STUDENTS))
def test_each_pair_distils_a_tiny_version_end_to_end(tmp_path, vit_b_teacher, student):
    get_config, _ = _get_config("ofa_imagenet")
    config = get_config(f"vit_b,{student}")
    config.dataset.update(name="sklearn_digits", image_size=IMAGE_SIZE,
                          data_dir=str(tmp_path / "tfds"))
    config.teacher.update(checkpoint=vit_b_teacher, overrides=TINY_VIT_B)
    config.student.overrides = TINY_STUDENTS[student]
    config.update(batch_size=16, total_steps=2, log_every_steps=1, eval_every_steps=2,
                  checkpoint_every_steps=2, progress_bar=False)
    handle = build.build_model(config.student, 10, np.float32)
    spec = build.model_spec(handle, IMAGE_SIZE)
    assert spec.token_stages == TOKEN_BRANCHES[student] and len(spec.stage_shapes) == 4
    result = train.train_and_evaluate(config, str(tmp_path))
    assert 0.0 <= result["eval/top1"] <= 100.0
    steps = [m for m in read_metrics(str(tmp_path)) if "train/loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert all(np.isfinite(m[f"train/{k}"])
                   for k in ["loss", "ce", "kd", "ofa", *(f"ofa_stage{s}" for s in range(1, 5))])
    # Token branches open with ViT blocks, CNN branches with separable convs.
    branches = ofa.OFABranches(spec, teacher_dim=TINY_VIT_B["embed_dim"])
    stages = [jnp.zeros((2, *shape)) for shape in spec.stage_shapes]
    params = jax.eval_shape(lambda: branches.init(jax.random.PRNGKey(0), stages,
                                                  train=False))["params"]
    assert ("block_0" in params["stage1"]) == TOKEN_BRANCHES[student]
    assert ("sepconv_0" in params["stage1"]) != TOKEN_BRANCHES[student]
