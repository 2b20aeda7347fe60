"""The baseline configs: CIFAR-100 at 32 px with CRD's recipe (the CoSS supplement's Tables
1-4), AT in PAT's ImageNet setting and SEED; each parses and its docstring states the command
and the published numbers."""

import importlib.util
import os

import pytest

from jaxkd import distill, models, recipes
from jaxkd.data import augment as augment_lib
from jaxkd.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# CoSS supplement Table 1 (linear-eval top-1): method -> (res56/res20, vgg13/vgg8,
# res32x4/res8x4).
TABLE1 = {"at": (49.00, 56.22, 43.11), "sp": (63.14, 71.62, 62.51),
          "vid": (68.61, 73.65, 69.60), "rkd": (56.28, 44.50, 32.33),
          "pkt": (61.58, 71.81, 64.53), "ft": (46.63, 39.71, 36.64),
          "nst": (25.62, 42.78, 41.27), "crd": (65.03, 69.73, 65.78),
          "srrl": (69.31, 72.85, 69.19)}
TABLE1_PAIRS = ("resnet56,resnet20", "vgg13,vgg8", "resnet32x4,resnet8x4")
# Tables 1-4 for CoSS itself: (pair, variant) -> top-1.
COSS = {("resnet56,resnet20", ""): 71.11, ("vgg13,vgg8", ""): 74.58,
        ("resnet32x4,resnet8x4", ""): 73.90, ("wrn_40_2,wrn_16_2", ""): 74.65,
        ("resnet32x4,resnet8x4", "co"): 72.05, ("resnet32x4,resnet8x4", "ss"): 73.53,
        ("resnet56,resnet20", "co"): 70.58, ("resnet56,resnet20", "ss"): 70.42,
        ("resnet32x4,resnet8x4", "lambda0.25"): 73.44, ("resnet32x4,resnet8x4", "lambda1"): 73.91,
        ("resnet56,resnet20", "lambda0.25"): 71.34, ("resnet56,resnet20", "lambda1"): 70.68,
        ("vgg13,vgg8", "bn"): 74.01, ("resnet32x4,resnet8x4", "bn"): 72.22,
        ("wrn_40_2,wrn_16_2", "bn"): 73.42}


def _module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs",
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_crd_recipe(config, epochs=240, decay=(150, 180, 210)):
    opt = config.optimizer
    assert (config.dataset.name, config.dataset.image_size) == ("cifar100", 32)
    assert config.batch_size == 128 and config.num_epochs == epochs
    assert config.label_smoothing == 0.0 and config.augment.flip
    assert (config.augment.random_resized_crop, config.augment.crop_padding) == (False, 4)
    assert (opt.name, opt.lr, opt.momentum, opt.weight_decay, opt.schedule, opt.warmup_epochs,
            tuple(opt.decay_epochs), opt.decay_factor) == (
        "sgd", 0.05, 0.9, 5e-4, "step", 0.0, decay, 0.1)


def test_unsupervised_baselines_follow_table1():
    module = _module("unsup_baselines_cifar")
    assert "python -m jaxkd.main --config=configs/unsup_baselines_cifar.py" in module.__doc__
    for method, numbers in TABLE1.items():
        for pair, number in zip(TABLE1_PAIRS, numbers):
            assert f"{number:.2f}" in module.__doc__, (method, pair)
            config = module.get_config(f"{method},{pair}")
            assert config.method.name == f"{method}_unsup"
            assert not distill.method_requirements(config.method.name).labels
            assert config.method.loss_scale == 1.0
            assert set(config.method) == {
                "name", *distill.method_entry(config.method.name).config_fields()}
            assert (config.teacher.name, config.student.name) == tuple(pair.split(","))
            if method == "ft":  # 30 paraphraser epochs first, the schedule shifted
                _check_crd_recipe(config, 270, (180, 210, 240))
                assert config.method.paraphraser_epochs == 30
                assert config.method.paraphraser_weight == (1.0 if pair == "vgg13,vgg8"
                                                            else 0.2)
            else:
                _check_crd_recipe(config)
            if method in ("sp", "rkd", "pkt"):
                assert config.method.stats_groups == 1
    with pytest.raises(ConfigError, match="method must be one of"):
        module.get_config("dist,resnet56,resnet20")
    with pytest.raises(ConfigError, match="not a known teacher,student pair"):
        module.get_config("at,wrn_40_2,wrn_16_2")  # not a Table 1 pair


def test_coss_cifar32_variants_follow_tables_1_to_4():
    module = _module("coss_cifar32")
    lines = module.__doc__.splitlines()
    for (pair, variant), number in COSS.items():
        row = next(line for line in lines if line.split()[:1] == [variant or "(none)"]
                   and f"{number:.2f}" in line)
        assert row, (pair, variant)
        config = module.get_config(f"{pair},{variant}" if variant else pair)
        _check_crd_recipe(config)
        assert config.dataset.sampler == "random"  # k = 0
        if variant == "bn":
            assert config.method.name == "coss_bn"
        else:
            assert config.method.name == "coss" and config.method.stats_groups == 1
    coss = {v: module.get_config(f"resnet56,resnet20,{v}" if v else "resnet56,resnet20").method
            for v in ("", "co", "ss", "lambda0.25", "lambda1")}
    assert [(m.co_weight, m.lambda_ss) for m in coss.values()] == [
        (1.0, 0.5), (1.0, 0.0), (0.0, 1.0), (1.0, 0.25), (1.0, 1.0)]
    with pytest.raises(ConfigError, match="variant must be one of"):
        module.get_config("resnet56,resnet20,lambda2")


def test_cifar32_configs_name_registered_32px_models():
    """Needs CRD's CIFAR models in the registry (resnet8x4 ... vgg13)."""
    for pair in recipes.COSS_CIFAR_PAIRS:
        for name in pair:
            assert models.model_info(name).input_size == 32, name


def test_at_imagenet_is_pats_homogeneous_setting():
    module = _module("at_imagenet")
    config = module.get_config()
    assert (config.teacher.name, config.student.name) == ("resnet34", "resnet18")
    assert config.method.name == "at" and config.method.at_weight == 1000.0
    assert (config.num_epochs, config.batch_size, config.optimizer.lr) == (100, 512, 0.1)
    for number in ("69.56", "73.31", "69.75"):
        assert number in module.__doc__
    with pytest.raises(ConfigError, match="not a known teacher,student pair"):
        module.get_config("res50,res18")


def test_seed_imagenet_with_and_without_space_similarity():
    module = _module("seed_imagenet")
    seed, seed_ss = module.get_config(), module.get_config("res50,res18,ss")
    assert (seed.method.name, seed.method.ss_weight, seed_ss.method.ss_weight) == (
        "seed", 0.0, 1.0)
    assert (seed.method.queue_size, seed.method.student_temp, seed.method.teacher_temp) == (
        65536, 0.2, 1e-4)
    assert seed.batch_size == 256 and seed.num_epochs == 200
    assert seed.method.queue_size % seed.batch_size == 0
    assert "57.60" in module.__doc__ and "58.30" in module.__doc__
    augment = augment_lib.AugmentConfig.from_config(seed.augment)  # MoCo v2's
    assert (augment.scale_min, augment.colour_jitter_prob, augment.colour_jitter,
            augment.grayscale_prob, augment.blur_prob, augment.blur_sigma, augment.flip) == (
        0.2, 0.8, (0.4, 0.4, 0.4, 0.1), 0.2, 0.5, (0.1, 2.0), True)
    with pytest.raises(ConfigError):
        module.get_config("res50,res18,kd")
