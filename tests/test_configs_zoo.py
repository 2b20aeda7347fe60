"""The method-zoo configs: each parses for every pair of its setting, refuses other pairs, and
follows the setting's recipe for the student's family."""

import importlib.util
import os

import pytest

from jaxkd import distill, recipes
from jaxkd.data import augment as augment_lib
from jaxkd.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("kd", "dkd", "dist", "fitnet", "crd", "ofa", "pat", "rsd", "cc", "rkd")
SETTINGS = {"cifar": recipes.CIFAR_PAIRS, "imagenet": recipes.IMAGENET_PAIRS}


def _get_config(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs",
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config


def _check_recipe(config, setting):
    """The REFERENCE.md section 3 table, row by row."""
    cnn = recipes.student_family(config.student.name) == "cnn"
    opt = config.optimizer
    assert config.dataset.image_size == 224 and config.label_smoothing == 0.1
    augment = augment_lib.AugmentConfig.from_config(config.augment)  # valid for the pipeline
    vit_extras = (augment.randaugment, augment.random_erasing, augment.mixup_alpha,
                  augment.cutmix_alpha, augment.label_smoothing)
    assert augment.random_resized_crop and augment.flip and augment.scale_min == 0.08
    assert vit_extras == (("", 0.0, 0.0, 0.0, 0.0) if cnn else
                          ("rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 0.1))
    if setting == "cifar":
        assert config.dataset.name == "cifar100" and config.batch_size == 8 * 128
        assert config.num_epochs == 300
        if cnn:
            assert (opt.name, opt.lr, opt.weight_decay, opt.end_lr, opt.warmup_epochs) == (
                "sgd", 0.05, 2e-3, 1e-3, 3)
        else:
            assert (opt.name, opt.lr, opt.weight_decay, opt.end_lr, opt.warmup_epochs,
                    opt.clip_norm) == ("adamw", 5e-4, 0.05, 1e-5, 20, 5.0)
    else:
        assert config.dataset.name == "imagenet2012"
        if cnn:
            assert (config.num_epochs, config.batch_size, config.ema_decay) == (100, 8 * 64, 0.0)
            assert (opt.name, opt.lr, opt.weight_decay, opt.schedule, tuple(opt.decay_epochs),
                    opt.decay_factor, opt.warmup_epochs) == (
                "sgd", 0.1, 1e-4, "step", (30, 60, 90), 0.1, 3)
        else:
            assert (config.num_epochs, config.batch_size, config.ema_decay) == (
                300, 8 * 128, 0.99996)
            assert (opt.name, opt.lr, opt.weight_decay, opt.schedule, opt.end_lr,
                    opt.warmup_epochs, opt.clip_norm) == (
                "adamw", 5e-4, 0.05, "cosine", 1e-6, 20, 5.0)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("method", METHODS)
def test_distillation_config_parses_for_every_pair(method, setting):
    get_config = _get_config(f"{method}_{setting}")
    default = get_config()
    for teacher, student in SETTINGS[setting]:
        config = get_config(f"{teacher},{student}")
        assert config.teacher.name == recipes.resolve_model(teacher)
        assert config.student.name == recipes.resolve_model(student)
        assert config.teacher.checkpoint == ""  # given on the command line
        assert config.method.name == method
        assert set(config.method) == {"name", *distill.method_entry(method).config_fields()}
        _check_recipe(config, setting)
    assert (default.teacher.name, default.student.name) == (
        "swin_tiny_patch4_window7_224", "resnet18")
    with pytest.raises(ConfigError, match="not a known teacher,student pair"):
        get_config("swin_t,res19")
    with pytest.raises(ConfigError, match="not a known teacher,student pair"):
        get_config("res18,swin_t")  # reversed


def test_method_settings_of_the_papers():
    ofa_cifar, ofa_imagenet = _get_config("ofa_cifar"), _get_config("ofa_imagenet")
    assert ofa_cifar("swin_t,res18").method.ofa_weight == 1.0
    assert ofa_cifar("vit_s,mbv2").method.ofa_weight == 0.1  # MobileNetV2 students
    assert ofa_cifar("swin_t,res18").method.eps == 1.0
    assert ofa_imagenet("deit_t,res18").method.eps == 1.5
    rsd_cifar, rsd_imagenet = _get_config("rsd_cifar")(), _get_config("rsd_imagenet")()
    assert (rsd_cifar.method.rsd_weight, rsd_cifar.method.expansion) == (0.1, 2.0)
    assert (rsd_imagenet.method.rsd_weight, rsd_imagenet.method.expansion) == (0.01, 4.0)
    assert _get_config("fitnet_cifar")().method.fitnet_weight == 0.1
    crd = _get_config("crd_imagenet")().method
    assert (crd.feat_dim, crd.num_negatives, crd.temperature, crd.momentum, crd.negatives) == (
        128, 16384, 0.07, 0.5, "other_class")
    pat_cifar = _get_config("pat_cifar")
    assert pat_cifar("swin_t,res18").method.se_gate_only is False
    official = pat_cifar("swin_t,res18,official")
    assert official.method.se_gate_only is True and official.student.name == "resnet18"
    with pytest.raises(ConfigError, match="third part"):
        pat_cifar("swin_t,res18,paper")


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_scratch_config_takes_a_student_or_a_pair(setting):
    get_config = _get_config(f"ce_{setting}")
    students = sorted({s for _, s in SETTINGS[setting]})
    for student in students:
        config = get_config(student)
        assert config.student.name == recipes.resolve_model(student)
        assert config.method.name == "ce" and config.teacher.name == ""
        _check_recipe(config, setting)
    for teacher, student in SETTINGS[setting]:  # the teacher of a pair is ignored
        config = get_config(f"{teacher},{student}")
        assert (config.student.name, config.teacher.name) == (recipes.resolve_model(student), "")
    assert get_config().student.name == "resnet18"
    with pytest.raises(ConfigError, match="not a student"):
        get_config("swin_t")  # a teacher only
    with pytest.raises(ConfigError, match="not a known teacher,student pair"):
        get_config("swin_t,res19")
