"""CRD's CIFAR models in distillation: 3-stage models through the generic code (methods,
CKA), clear refusals where a method needs 4 stages, and tiny end-to-end runs on the digits."""

import json
import os

import ml_collections
import numpy as np
import pytest

from jaxkd import build, distill, train
from jaxkd.analysis import training_eval
from jaxkd.analysis.cka import linear_cka
from jaxkd.data import neighbours
from jaxkd.errors import ConfigError
from jaxkd.metric_writer import read_metrics

from cifar_twins import export_twin_as_teacher
from helpers import load_script, tiny_config

CTX = distill.MethodContext(num_devices=1, label_smoothing=0.0, num_train_examples=50,
                            train_labels=np.arange(50) % 10)
# One block per stage: CoSS's ResNet56 -> ResNet20 pair as cheap to compile as can be.
ONE_BLOCK_PER_STAGE = {"depth": 8}
# The digits at their own 8 px: every model here still has a map per stage (VGG's last two are
# 1 x 1), and evaluating teacher and student on the eval split costs a quarter of 16 px.
IMAGE_SIZE = 8


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _spec(name, image_size=32, **overrides):
    config = ml_collections.ConfigDict({"name": name, "overrides": overrides})
    return build.model_spec(build.build_model(config, 10, np.float32), image_size)


def _method(name, student, teacher, **fields):
    return distill.create_method(distill.method_config(name, **fields), student, teacher, CTX)


def test_methods_needing_four_stages_refuse_three_stage_models():
    r8x4, r32x4, vgg13 = _spec("resnet8x4"), _spec("resnet32x4"), _spec("vgg13")
    assert len(r8x4.stage_shapes) == 3 and len(vgg13.stage_shapes) == 4
    with pytest.raises(ConfigError, match="'resnet8x4' has 3 stage features; OFA branches need 4"):
        _method("ofa", r8x4, vgg13, stages=(1, 2, 3))
    with pytest.raises(ConfigError, match="OFA branches need 4"):
        _method("rsd_ofa", r8x4, vgg13, stages=(3,))
    with pytest.raises(ConfigError, match=r"'resnet8x4' has 3 stage features \(stages 1-3\)"):
        _method("fitnet", r8x4, r32x4)  # the default stages are 1-4
    with pytest.raises(ConfigError, match="student 'resnet8x4' has 3 stages, teacher 'vgg13' 4"):
        _method("pat", r8x4, vgg13)
    # What the stages allow still works: FitNet on stages both have, PAT between equal counts.
    fitnet = _method("fitnet", r8x4, vgg13, stages=(2, 3))
    assert len(fitnet.alignments) == 2
    assert _method("pat", r8x4, r32x4).teacher_stage_shapes == r32x4.stage_shapes


def test_cka_metrics_pair_stages_only_between_equal_counts():
    rng = np.random.default_rng(0)

    def layers(num_stages):  # [4 examples, 6 features] per stage, then the embedding
        return [rng.normal(size=(4, 6)).astype(np.float32) for _ in range(num_stages + 1)]

    batch = {"mask": np.ones(4), "image": np.zeros((4, 2, 2, 3), np.float32)}
    student, teacher, vgg_teacher = layers(3), layers(3), layers(4)
    equal = training_eval.cka_metrics(lambda _: (student, teacher), [batch], 4)
    assert sorted(equal) == ["eval/cka_embedding", "eval/cka_stage1", "eval/cka_stage2",
                             "eval/cka_stage3"]
    assert equal["eval/cka_stage3"] == pytest.approx(float(linear_cka(teacher[2], student[2])))
    mixed = training_eval.cka_metrics(lambda _: (student, vgg_teacher), [batch], 4)
    assert list(mixed) == ["eval/cka_embedding"]
    assert mixed["eval/cka_embedding"] == pytest.approx(
        float(linear_cka(vgg_teacher[-1], student[-1])))


def test_rsd_from_a_vgg8_teacher_into_a_resnet8x4_student(tmp_path, digits_dir):
    """Supervised, a 4-stage teacher (a RepDistiller-layout checkpoint, converted) and a
    3-stage student, with the CKA evaluation on; the exports then go through scripts/cka.py."""
    teacher = export_twin_as_teacher(str(tmp_path / "teacher"), "vgg8", 10)
    config = tiny_config("rsd", data_dir=digits_dir, teacher_checkpoint=teacher, steps=2)
    config.student.name, config.student.overrides = "resnet8x4", {}
    config.teacher.name, config.teacher.overrides = "vgg8", {}
    config.dataset.image_size = IMAGE_SIZE
    config.eval_cka_examples = 64
    workdir = str(tmp_path / "run")
    result = train.train_and_evaluate(config, workdir)
    steps = [m for m in read_metrics(workdir) if "train/loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(np.isfinite(m["train/rsd"]) and np.isfinite(m["train/ce"]) for m in steps)
    assert 0.0 <= result["eval/top1"] <= 100.0
    assert 0.0 <= result["eval/cka_embedding"] <= 1.0 + 1e-6
    assert not any(k.startswith("eval/cka_stage") for k in result)

    out = str(tmp_path / "cka")
    assert load_script("cka").main([
        "--teacher", teacher, "--student", os.path.join(workdir, "export"),
        "--dataset", "sklearn_digits", "--data-dir", digits_dir,
        "--image-size", str(IMAGE_SIZE), "--num-examples", "64", "--out", out]) == 0
    with open(os.path.join(out, "cka.json")) as f:
        cka = json.load(f)
    assert cka["teacher_layers"] == ["stage1", "stage2", "stage3", "stage4", "embedding"]
    assert cka["student_layers"] == ["stage1", "stage2", "stage3", "embedding"]
    assert np.array(cka["cka"]).shape == (5, 4)
    assert cka["cka"][-1][-1] == pytest.approx(result["eval/cka_embedding"], abs=1e-5)


def test_coss_from_resnet56_into_resnet20(tmp_path, digits_dir):
    """Unsupervised, a pair of CoSS's CIFAR-100 table (both cut to one block per stage)."""
    teacher = export_twin_as_teacher(str(tmp_path / "teacher"), "resnet56", 10,
                                     **ONE_BLOCK_PER_STAGE)
    config = tiny_config("coss", data_dir=digits_dir, teacher_checkpoint=teacher, steps=2,
                         hidden_dim=64)
    config.student.name = "resnet20"
    config.student.overrides = dict(ONE_BLOCK_PER_STAGE)
    config.teacher.name, config.teacher.overrides = "resnet56", dict(ONE_BLOCK_PER_STAGE)
    config.dataset.update(image_size=IMAGE_SIZE, num_neighbours=3, neighbour_pool=5,
                          index_size=8)
    config.eval_batch_size = 256  # also the batch of the teacher's pass over the train split
    workdir = str(tmp_path / "run")
    result = train.train_and_evaluate(config, workdir)
    steps = [m for m in read_metrics(workdir) if "train/loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(np.isfinite(m["train/coss"]) and "train/top1" not in m for m in steps)
    assert "eval/top1" not in result and 0.0 <= result["eval/knn_top1"] <= 100.0
    # The teacher's neighbour index over the digits' train split.
    assert np.load(neighbours.index_path(workdir, 8)).shape == (1437, 8)
