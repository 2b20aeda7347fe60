"""Shared config building blocks: the base config, the paper recipes and the experiment pairs.

Config files in configs/ are thin `get_config(arg)` functions over these, so a recipe lives in
one place. Every field the trainer reads exists in `base_config()`, and configs are locked, so
a misspelt field is an error rather than silently ignored.
"""

from __future__ import annotations

import ml_collections

from jaxkd import distill, models
from jaxkd.errors import ConfigError

# Short names used in config arguments ("swin_t,res18").
ALIASES = {
    "res18": "resnet18", "res34": "resnet34", "res50": "resnet50", "mbv2": "mobilenetv2_100",
    "convnext_t": "convnext_tiny", "deit_t": "deit_tiny_patch16_224",
    "vit_s": "vit_small_patch16_224", "vit_b": "vit_base_patch16_224",
    "swin_t": "swin_tiny_patch4_window7_224", "swin_n": "swin_nano_patch4_window7_224",
    "swin_p": "swin_pico_patch4_window7_224", "mixer_b16": "mixer_b16_224",
    "resmlp_s12": "resmlp_12_224",
}

# (teacher, student) pairs of the papers' tables (REFERENCE.md section 3).
CIFAR_PAIRS = (
    ("swin_t", "res18"), ("vit_s", "res18"), ("mixer_b16", "res18"),
    ("swin_t", "mbv2"), ("vit_s", "mbv2"), ("mixer_b16", "mbv2"),
    ("convnext_t", "deit_t"), ("mixer_b16", "deit_t"),
    ("convnext_t", "swin_p"), ("mixer_b16", "swin_p"),
    ("convnext_t", "resmlp_s12"), ("swin_t", "resmlp_s12"),
)

CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)

# Student family of each aliased model, so configs parse before the model zoo is imported.
_FAMILY = {"res18": "cnn", "res34": "cnn", "res50": "cnn", "mbv2": "cnn", "convnext_t": "cnn",
           "deit_t": "vit", "vit_s": "vit", "vit_b": "vit", "swin_t": "vit", "swin_n": "vit",
           "swin_p": "vit", "mixer_b16": "mlp", "resmlp_s12": "mlp"}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.description = ""  # one line, shown in suite summaries
    c.dataset = ml_collections.ConfigDict(
        {"name": "cifar100", "data_dir": "", "image_size": 224, "train_fraction": 1.0})
    c.student = ml_collections.ConfigDict({"name": "", "overrides": {}})
    c.teacher = ml_collections.ConfigDict({"name": "", "checkpoint": "", "overrides": {}})
    c.method = distill.method_config("ce")
    c.optimizer = ml_collections.ConfigDict({
        "name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False, "b1": 0.9, "b2": 0.999,
        "eps": 1e-8, "weight_decay": 0.0, "schedule": "cosine", "warmup_epochs": 0.0,
        "end_lr": 0.0, "decay_epochs": (), "decay_factor": 0.1, "clip_norm": 0.0})
    c.augment = ml_collections.ConfigDict(
        {"random_resized_crop": True, "scale_min": 0.08, "flip": True})
    c.batch_size = 128  # global, over all devices and processes
    c.eval_batch_size = 0  # 0: same as batch_size
    c.num_epochs = 1.0
    c.total_steps = 0  # > 0 overrides num_epochs
    c.label_smoothing = 0.0
    c.compute_dtype = "float32"
    c.ema_decay = 0.0
    c.log_every_steps = 50
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    c.progress_bar = True
    return c


def resolve_model(alias_or_name: str) -> str:
    return ALIASES.get(alias_or_name, alias_or_name)


def parse_pair(arg: str, pairs) -> tuple[str, str]:
    """'teacher,student' (aliases) -> timm names; the pair must be one of `pairs`."""
    parts = tuple(p.strip() for p in (arg or "").split(","))
    if len(parts) != 2 or parts not in pairs:
        listed = " ".join(f"{t},{s}" for t, s in pairs)
        raise ConfigError(f"config argument {arg!r} is not a known teacher,student pair; "
                          f"choose one of: {listed}")
    return resolve_model(parts[0]), resolve_model(parts[1])


def student_family(name: str) -> str:
    for alias, full in ALIASES.items():
        if full == name:
            return _FAMILY[alias]
    return models.model_info(name).family


def cifar_recipe(config: ml_collections.ConfigDict, student: str) -> None:
    """OFA-KD's CIFAR-100 recipe (REFERENCE.md section 3): 300 epochs at 224 px, 8 x 128.

    SGD for CNN students; AdamW for ViT/MLP students (their RandAugment, mixup/cutmix and
    random-erasing augmentations are added with the method zoo).
    """
    config.dataset.name = "cifar100"
    config.dataset.image_size = 224
    config.batch_size = 1024
    config.num_epochs = 300
    config.label_smoothing = 0.1
    if student_family(student) == "cnn":
        config.optimizer.update(name="sgd", lr=0.05, momentum=0.9, weight_decay=2e-3,
                                schedule="cosine", end_lr=1e-3, warmup_epochs=3)
    else:
        config.optimizer.update(name="adamw", lr=5e-4, weight_decay=0.05, schedule="cosine",
                                end_lr=1e-5, warmup_epochs=20, clip_norm=5.0)
    config.log_every_steps = 100
    config.eval_every_steps = 2000
    config.checkpoint_every_steps = 2000
