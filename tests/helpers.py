"""Tiny configs and random teachers shared by the trainer tests."""

import importlib.util
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import checkpoint, data, distill, models, recipes, train
from jaxkd.metric_writer import read_metrics

TINY_VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2}
VIT = "deit_tiny_patch16_224"
TINY_RESNET = {"layers": [1, 1, 1, 1]}


def tiny_config(method: str = "ce", *, data_dir: str = "", dataset: str = "sklearn_digits",
                teacher_checkpoint: str = "", steps: int = 4, batch_size: int = 16, **fields):
    config = recipes.base_config()
    config.dataset.update(name=dataset, image_size=16, data_dir=data_dir)
    config.student.name = VIT
    config.student.overrides = dict(TINY_VIT)
    config.method = distill.method_config(method, **fields)
    if distill.method_requirements(method).uses_teacher:
        config.teacher.update(name=VIT, checkpoint=teacher_checkpoint)
        config.teacher.overrides = dict(TINY_VIT)
    config.optimizer.update(name="adamw", lr=1e-3, weight_decay=0.05, schedule="cosine",
                            warmup_epochs=0)
    config.batch_size = batch_size
    config.total_steps = steps
    config.log_every_steps = 1
    config.eval_every_steps = steps
    config.checkpoint_every_steps = steps
    config.progress_bar = False
    return config


def random_teacher(out_dir: str, num_classes: int, *, name: str = VIT, overrides=None,
                   seed: int = 1, image_size: int = 16) -> str:
    overrides = dict(TINY_VIT if overrides is None else overrides)
    module = models.create_model(name, num_classes=num_classes, **overrides)
    variables = module.init(jax.random.PRNGKey(seed),
                            jnp.zeros((1, image_size, image_size, 3)), train=False)
    return checkpoint.save_model(out_dir, jax.device_get(variables), model_name=name,
                                 num_classes=num_classes, overrides=overrides)


def random_teachers(root) -> dict[str, str]:
    """Random 10-class teachers for the digits: a tiny DeiT ('vit') and ResNet18 ('cnn')."""
    return {"vit": random_teacher(str(root / "vit"), num_classes=10),
            "cnn": random_teacher(str(root / "cnn"), num_classes=10, name="resnet18",
                                  overrides=TINY_RESNET)}


def distil_two_steps(workdir, digits_dir, teachers, method, student, teacher, **fields):
    """Two steps of `method` on the digits from `teachers[teacher]` to a tiny student ('vit',
    'cnn', or a (name, overrides) pair) -> (config, train_and_evaluate's result, the two
    steps' metrics rows)."""
    config = tiny_config(method, data_dir=digits_dir, teacher_checkpoint=teachers[teacher],
                         steps=2, **fields)
    for side, kind in ((config.student, student), (config.teacher, teacher)):
        if kind == "cnn":
            side.name, side.overrides = "resnet18", dict(TINY_RESNET)
        elif isinstance(kind, tuple):
            side.name, side.overrides = kind[0], dict(kind[1])
    result = train.train_and_evaluate(config, str(workdir))
    steps = [m for m in read_metrics(str(workdir)) if "train/loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    return config, result, steps


def random_batches(num_steps, batch_size=16, image_size=16, num_classes=10):
    """Train batches of random images and labels (numpy, as the pipeline yields them)."""
    rng = np.random.RandomState(0)
    return [{"image": rng.rand(batch_size, image_size, image_size, 3).astype(np.float32),
             "label": rng.randint(0, num_classes, batch_size).astype(np.int32),
             "index": np.arange(batch_size, dtype=np.int32)} for _ in range(num_steps)]


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package)."""
    path = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _views(student, teacher, teacher_forward):
    return (distill.Outputs(*student),
            None if teacher is None else distill.TeacherView(*teacher, rerun=teacher_forward))


def init_method(method, rng, student, teacher, batch, *, teacher_forward=None, **kwargs):
    """`method.init` on (logits, features) tuples."""
    return method.init(rng, *_views(student, teacher, teacher_forward), batch, **kwargs)


def apply_method(method, variables, student, teacher, batch, *, teacher_forward=None, **kwargs):
    """`method.apply` on (logits, features) tuples, returning (loss, metrics) as
    jaxkd.distill.total_loss sums the terms (and the new state when `mutable` is given)."""
    out = method.apply(variables, *_views(student, teacher, teacher_forward), batch, **kwargs)
    if kwargs.get("mutable", False) is not False:
        terms, state = out
        return distill.total_loss(terms), state
    return distill.total_loss(out)


def sampler_batches(name: str, data_dir: str, *, global_batch_size: int, image_size: int,
                   seed: int, augment, train_fraction: float = 1.0, **batches_kwargs):
    """The random sampler's train batches of a dataset; `augment` holds AugmentConfig fields
    (None: a plain resize), `batches_kwargs` go to `RandomSampler.batches`."""
    dataset = data.open_dataset(name, data_dir, train_fraction)
    augment = None if augment is None else data.AugmentConfig.from_config(augment)
    sampler = data.RandomSampler(data.TrainData(global_batch_size, image_size, seed, augment))
    return sampler.batches(dataset, **batches_kwargs)


def model_spec(name, family, num_classes, embed_dim, stage_shapes):
    """A distill.ModelSpec written out (family "cnn": maps, otherwise tokens)."""
    return distill.ModelSpec(name=name, num_classes=num_classes, embed_dim=embed_dim,
                             stage_shapes=tuple(map(tuple, stage_shapes)),
                             token_stages=family != "cnn")


def random_outputs(spec, seed, batch=8):
    """Random (logits, features) shaped as `spec`'s model returns them."""
    rng = np.random.RandomState(seed)
    normal = lambda *shape: jnp.asarray(rng.randn(batch, *shape), jnp.float32)  # noqa: E731
    return (normal(spec.num_classes), {"embedding": normal(spec.embed_dim),
                                       "stages": [normal(*s) for s in spec.stage_shapes]})


def method_batch(num_classes, batch=8):
    """A method's batch without images: labels and train-split indices."""
    return {"label": jnp.arange(batch, dtype=jnp.int32) % num_classes,
            "index": jnp.arange(batch, dtype=jnp.int32) * 3}


def assert_float32_scalar_matches(loss_fn, reference, inputs32, inputs64, *, rtol, atol):
    """loss_fn on the float32 inputs is a float32 scalar equal to `reference` on the float64
    ones."""
    value = loss_fn(*inputs32)
    chex.assert_shape(value, ())
    chex.assert_type(value, jnp.float32)
    chex.assert_trees_all_close(value, np.float32(reference(*inputs64)), rtol=rtol, atol=atol)


def assert_teacher_gets_no_gradient(loss_fn, inputs, teacher_index: int) -> None:
    """d loss / d teacher input is exactly zero (the loss stops it), d loss / d student input
    (argument 0) is finite and not zero."""
    grad_student, grad_teacher = jax.jit(jax.grad(loss_fn, argnums=(0, teacher_index)))(
        *inputs)
    chex.assert_trees_all_equal(grad_teacher, np.zeros_like(inputs[teacher_index]))
    chex.assert_tree_all_finite(grad_student)
    assert float(jnp.max(jnp.abs(grad_student))) > 1e-6
