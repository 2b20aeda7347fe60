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
    "resmlp_s12": "resmlp_12_224", "vip_s7": "vip_s7", "cyclemlp_b3": "cyclemlp_b3",
    "hiremlp_s": "hire_mlp_small",
}

# (teacher, student) pairs of the papers' tables (REFERENCE.md section 3).
CIFAR_PAIRS = (
    ("swin_t", "res18"), ("vit_s", "res18"), ("mixer_b16", "res18"),
    ("swin_t", "mbv2"), ("vit_s", "mbv2"), ("mixer_b16", "mbv2"),
    ("convnext_t", "deit_t"), ("mixer_b16", "deit_t"),
    ("convnext_t", "swin_p"), ("mixer_b16", "swin_p"),
    ("convnext_t", "resmlp_s12"), ("swin_t", "resmlp_s12"),
)

# ImageNet pairs: ResNet18 and MobileNetV2 from DeiT-T, Swin-T, Mixer-B/16; DeiT-T, Swin-N and
# ResMLP-S12 from ResNet50, ConvNeXt-T and Mixer-B/16 (ResMLP-S12: Swin-T instead of Mixer).
IMAGENET_PAIRS = (
    ("deit_t", "res18"), ("swin_t", "res18"), ("mixer_b16", "res18"),
    ("deit_t", "mbv2"), ("swin_t", "mbv2"), ("mixer_b16", "mbv2"),
    ("res50", "deit_t"), ("convnext_t", "deit_t"), ("mixer_b16", "deit_t"),
    ("res50", "swin_n"), ("convnext_t", "swin_n"), ("mixer_b16", "swin_n"),
    ("res50", "resmlp_s12"), ("convnext_t", "resmlp_s12"), ("swin_t", "resmlp_s12"),
)

# The OFA-KD supplement's MLP students (its section A, Figure 5), all taught by a ViT-B.
OFA_MLP_PAIRS = (("vit_b", "mixer_b16"), ("vit_b", "vip_s7"), ("vit_b", "cyclemlp_b3"),
                 ("vit_b", "hiremlp_s"))



def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.description = ""  # one line, shown in suite summaries
    # sampler: "" = the one the method declares; "random" (jaxkd.data.RandomSampler) or
    # "neighbours" (CoSS's nearest-neighbour batches, jaxkd.data.NeighbourSampler: anchors of
    # 1 + num_neighbours images, neighbours drawn from the top neighbour_pool of a teacher
    # index of index_size neighbours per example).
    c.dataset = ml_collections.ConfigDict(
        {"name": "cifar100", "data_dir": "", "image_size": 224, "train_fraction": 1.0,
         "sampler": "", "num_neighbours": 15, "neighbour_pool": 31, "index_size": 384})
    c.student = ml_collections.ConfigDict({"name": "", "overrides": {}})
    # min_top1 > 0: a teacher whose held-out top-1 (%) at step 0 is below it stops the run
    # (exit 2); a teacher near chance level is always reported loudly.
    c.teacher = ml_collections.ConfigDict({"name": "", "checkpoint": "", "overrides": {},
                                           "min_top1": 0.0})
    c.method = distill.method_config("ce")
    c.optimizer = ml_collections.ConfigDict({
        "name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False, "b1": 0.9, "b2": 0.999,
        "eps": 1e-8, "weight_decay": 0.0, "schedule": "cosine", "warmup_epochs": 0.0,
        "end_lr": 0.0, "decay_epochs": (), "decay_factor": 0.1, "clip_norm": 0.0})
    # jaxkd.data.augment.AugmentConfig's fields; the ViT-recipe extras are off by default.
    # mix_per_device: mixup/cutmix draws per device batch (the official runs' per-GPU draws).
    c.augment = ml_collections.ConfigDict(
        {"random_resized_crop": True, "scale_min": 0.08, "crop_padding": 0,
         "colour_jitter_prob": 0.0, "colour_jitter": (0.4, 0.4, 0.4, 0.1),
         "grayscale_prob": 0.0, "blur_prob": 0.0, "blur_sigma": (0.1, 2.0), "flip": True,
         "randaugment": "", "random_erasing": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "mixup_prob": 1.0,
         "mixup_switch_prob": 0.5, "label_smoothing": 0.0, "mix_per_device": True})
    c.batch_size = 128  # global, over all devices and processes
    c.eval_batch_size = 0  # 0: same as batch_size
    c.num_epochs = 1.0
    c.total_steps = 0  # > 0 overrides num_epochs
    c.label_smoothing = 0.0
    c.compute_dtype = "float32"
    # How the train state sits on the devices (jaxkd.sharding): "data" replicates it; "fsdp"
    # shards parameters and optimiser state over the data axis. The same for the teacher.
    c.sharding = "data"
    c.teacher_sharding = "data"
    # Multi-process runs (jaxkd.sharding.distributed_settings); unset = single process, or
    # the JAXKD_COORDINATOR / JAXKD_NUM_PROCESSES / JAXKD_PROCESS_ID environment variables.
    c.distributed = ml_collections.ConfigDict(
        {"coordinator_address": "", "num_processes": 0, "process_id": -1, "auto_detect": False})
    c.ema_decay = 0.0
    # A step whose loss or gradient is non-finite leaves the state unchanged. True: training
    # goes on (train/nonfinite counts such steps); False: the run stops with NonFiniteLossError.
    c.skip_nonfinite_updates = False
    c.log_every_steps = 50
    c.eval_every_steps = 1000
    # Evaluators run at every evaluation (jaxkd.evaluators): empty = the method's defaults
    # ("classification" for methods that read labels, "knn" for those that do not), plus
    # "cka" when eval_cka_examples > 0; the teacher's top-1 is measured once at step 0.
    c.evals = ()
    # The teacher-student linear CKA of each stage and of the embeddings (eval/cka_*) on this
    # many eval examples; > 0 adds the "cka" evaluator to the defaults.
    c.eval_cka_examples = 0
    c.checkpoint_every_steps = 1000
    c.progress_bar = True
    # Population training (jaxkd.population): the product of `seeds` and the swept values,
    # trained together in one step that runs the teacher once per batch. `sweep` maps a
    # field's path to its values, nested like the config ({"method": {"rsd_weight": (...)}},
    # or `population(config, sweep={"method.rsd_weight": (...)})`); `map` is how the step
    # goes over the members: "loop" (each member's own program, unrolled; any sweep) or "vmap"
    # (one program mapped over them; seeds only). `member_devices` > 1 (vmap only) spreads
    # the members over that many groups of devices (a 2-D mesh: member x data). No seeds and
    # no sweep: a single run with `seed`.
    c.population = ml_collections.ConfigDict(
        {"seeds": (), "sweep": ml_collections.ConfigDict(), "map": "loop", "member_devices": 1})
    return c


def population(config: ml_collections.ConfigDict, *, seeds=(), sweep=None,
               **fields) -> ml_collections.ConfigDict:
    """Makes `config` a population of `seeds` x the values of `sweep` ({"method.rsd_weight":
    (0.05, 0.1), ...}: a field's dotted path to its values); `fields`: map, member_devices."""
    nested = ml_collections.ConfigDict()
    for path, values in (sweep or {}).items():
        *sections, name = path.split(".")
        section = nested
        for key in sections:
            if key not in section:
                section[key] = ml_collections.ConfigDict()
            section = section[key]
        section[name] = tuple(values)
    config.population.update(seeds=tuple(seeds), sweep=nested, **fields)
    return config


def resolve_model(alias_or_name: str) -> str:
    return ALIASES.get(alias_or_name, alias_or_name)


def split_variant(arg: str, variant: str) -> tuple[str, bool]:
    """('teacher,student', True) from 'teacher,student,<variant>'; (arg, False) otherwise."""
    parts = [p.strip() for p in (arg or "").split(",")]
    if len(parts) == 3:
        if parts[2] != variant:
            raise ConfigError(f"config argument {arg!r}: the third part may only be "
                              f"{variant!r}")
        return ",".join(parts[:2]), True
    return arg, False


def parse_pair(arg: str, pairs) -> tuple[str, str]:
    """'teacher,student' (aliases) -> timm names; the pair must be one of `pairs`."""
    parts = tuple(p.strip() for p in (arg or "").split(","))
    if len(parts) != 2 or parts not in pairs:
        listed = " ".join(f"{t},{s}" for t, s in pairs)
        raise ConfigError(f"config argument {arg!r} is not a known teacher,student pair; "
                          f"choose one of: {listed}")
    return resolve_model(parts[0]), resolve_model(parts[1])


def student_family(name: str) -> str:
    return models.model_info(name).family


def vit_augmentations(config: ml_collections.ConfigDict) -> None:
    """The ViT/MLP-student augmentations of the official configs (cifar|imagenet/vit_mlp.yaml):
    RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 / cutmix 1.0 with soft
    labels smoothed by 0.1. (Their colour jitter 0.4 is inactive in timm next to RandAugment.)"""
    config.augment.update(randaugment="rand-m9-mstd0.5-inc1", random_erasing=0.25,
                          mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)


def cifar_recipe(config: ml_collections.ConfigDict, student: str) -> None:
    """OFA-KD's CIFAR-100 recipe (REFERENCE.md section 3): 300 epochs at 224 px, 8 x 128.

    SGD for CNN students; AdamW for ViT/MLP students, with their augmentations
    (`vit_augmentations`).
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
        vit_augmentations(config)
    config.log_every_steps = 100
    config.eval_every_steps = 2000
    config.checkpoint_every_steps = 2000


def imagenet_recipe(config: ml_collections.ConfigDict, student: str) -> None:
    """OFA-KD's ImageNet recipe (REFERENCE.md section 3, the official configs/imagenet/*.yaml).

    CNN students: 100 epochs, 8 x 64, SGD lr 0.1 decayed x0.1 at epochs 30/60/90 after 3
    warmup epochs, wd 1e-4. ViT/MLP students: 300 epochs, 8 x 128, AdamW lr 5e-4, cosine to
    1e-6 after 20 warmup epochs, wd 0.05, clip 5, EMA 0.99996 and `vit_augmentations`.
    Label smoothing 0.1 for both.
    """
    config.dataset.name = "imagenet2012"
    config.dataset.image_size = 224
    config.label_smoothing = 0.1
    if student_family(student) == "cnn":
        config.batch_size = 512
        config.num_epochs = 100
        config.optimizer.update(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4,
                                schedule="step", decay_epochs=(30, 60, 90), decay_factor=0.1,
                                warmup_epochs=3)
    else:
        config.batch_size = 1024
        config.num_epochs = 300
        config.optimizer.update(name="adamw", lr=5e-4, weight_decay=0.05, schedule="cosine",
                                end_lr=1e-6, warmup_epochs=20, clip_norm=5.0)
        config.ema_decay = 0.99996
        vit_augmentations(config)
    config.log_every_steps = 100
    config.eval_every_steps = 5000
    config.checkpoint_every_steps = 5000


# setting -> (its teacher,student pairs, its recipe)
SETTINGS = {"cifar": (CIFAR_PAIRS, cifar_recipe), "imagenet": (IMAGENET_PAIRS, imagenet_recipe)}


def _setting(name: str):
    if name not in SETTINGS:
        raise ConfigError(f"unknown setting {name!r}; use one of {sorted(SETTINGS)}")
    return SETTINGS[name]


def distillation_config(setting: str, arg: str, method: str, *, pairs=None, **method_fields
                        ) -> ml_collections.ConfigDict:
    """The config of `method` (with `method_fields`) for the 'teacher,student' pair `arg` of
    `setting` ('cifar' or 'imagenet'; or of `pairs` when given), with that setting's recipe
    for the student."""
    setting_pairs, recipe = _setting(setting)
    teacher, student = parse_pair(arg, setting_pairs if pairs is None else pairs)
    config = base_config()
    recipe(config, student)
    config.student.name = student
    config.teacher.name = teacher
    config.method = distill.method_config(method, **method_fields)
    return config


def coss_config(dataset: str, arg: str) -> ml_collections.ConfigDict:
    """CoSS (unsupervised) for any 'teacher,student' of the zoo on `dataset`: nearest-neighbour
    batches of 16 anchors x 16 images per device on 8 devices, SGD lr 0.03, momentum 0.9,
    wd 1e-4, cosine, 25 epochs (REFERENCE.md section 1)."""
    parts = [p.strip() for p in (arg or "").split(",")]
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"config argument {arg!r} is not 'teacher,student'")
    config = base_config()
    config.dataset.update(name=dataset, image_size=224, num_neighbours=15,
                          neighbour_pool=31, index_size=384)
    config.teacher.name, config.student.name = (resolve_model(p) for p in parts)
    config.method = distill.method_config("coss", lambda_ss=1.0)
    config.batch_size = 8 * 16 * 16
    config.num_epochs = 25
    config.optimizer.update(name="sgd", lr=0.03, momentum=0.9, weight_decay=1e-4,
                            schedule="cosine")
    config.log_every_steps = 50
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 1000
    return config


def parse_student(arg: str, pairs) -> str:
    """A student alias of `pairs`, alone or as the student of one of the pairs (the teacher
    is then ignored) -> its timm name."""
    if "," in (arg or ""):
        return parse_pair(arg, pairs)[1]
    students = sorted({s for _, s in pairs})
    if arg not in students:
        raise ConfigError(f"config argument {arg!r} is not a student of this setting; choose "
                          f"one of: {' '.join(students)} (or a teacher,student pair)")
    return resolve_model(arg)


def scratch_config(setting: str, arg: str, *, pairs=None) -> ml_collections.ConfigDict:
    """Cross-entropy training of the student of `arg` (see parse_student; among `pairs` when
    given, else the setting's) without a teacher."""
    setting_pairs, recipe = _setting(setting)
    student = parse_student(arg, setting_pairs if pairs is None else pairs)
    config = base_config()
    recipe(config, student)
    config.student.name = student
    return config


# --- CIFAR-100 at 32 px with CRD's recipe ------------------------------------------------------

# The teacher,student pairs of the CoSS supplement's CIFAR-100 tables (CRD's CIFAR models,
# registry names).
COSS_CIFAR_PAIRS = (("resnet56", "resnet20"), ("vgg13", "vgg8"), ("resnet32x4", "resnet8x4"),
                    ("wrn_40_2", "wrn_16_2"))
CIFAR32_EPOCHS = 240
CIFAR32_DECAY_EPOCHS = (150, 180, 210)
# CoSS's unsupervised runs (URepDistiller's train_unsupervised_student.py) keep CRD's recipe
# but for its default batch of 128.
UNSUPERVISED_CIFAR32_BATCH = 128


def cifar32_recipe(config: ml_collections.ConfigDict, *, batch_size: int = 64,
                   extra_epochs: float = 0.0) -> None:
    """CRD's CIFAR-100 recipe (RepDistiller's train_student.py): 32 px, 240 epochs, batch 64,
    SGD lr 0.05 momentum 0.9, weight decay 5e-4, lr x0.1 at epochs 150, 180 and 210, no warmup,
    no label smoothing (its students MobileNetV2/ShuffleNets use lr 0.01; none here).
    `extra_epochs` run first and shift the schedule (FT's paraphraser pre-training).

    Augmentation: the original's RandomCrop(32, padding=4) and horizontal flip. The weight
    decay spares biases and BN parameters (jaxkd.optim); PyTorch's SGD decays them too.
    """
    config.dataset.update(name="cifar100", image_size=32)
    config.batch_size = batch_size
    config.num_epochs = CIFAR32_EPOCHS + extra_epochs
    config.label_smoothing = 0.0
    config.optimizer.update(name="sgd", lr=0.05, momentum=0.9, nesterov=False,
                            weight_decay=5e-4, schedule="step", warmup_epochs=0.0,
                            decay_epochs=tuple(e + extra_epochs for e in CIFAR32_DECAY_EPOCHS),
                            decay_factor=0.1)
    config.augment.update(random_resized_crop=False, crop_padding=4, flip=True)
    config.log_every_steps = 100
    config.eval_every_steps = 5000
    config.checkpoint_every_steps = 5000


def cifar32_config(arg: str, pairs, method: str, *, batch_size: int = 64,
                   extra_epochs: float = 0.0, **method_fields) -> ml_collections.ConfigDict:
    """`method` for the 'teacher,student' pair `arg` (registry names) of `pairs` with
    cifar32_recipe."""
    teacher, student = parse_pair(arg, pairs)
    config = base_config()
    cifar32_recipe(config, batch_size=batch_size, extra_epochs=extra_epochs)
    config.teacher.name, config.student.name = teacher, student
    config.method = distill.method_config(method, **method_fields)
    return config
