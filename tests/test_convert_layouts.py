"""Checkpoint layouts besides timm 1.0's, each found from its keys and converted with parity
against the code that writes it: timm 0.6.5 itself (run in a subprocess), timm's own `.npz`
loader, the original Flax Mixer, and the original module names of Facebook's ConvNeXt and of
MoCo. Also the converter registry and the one-message error for a file of no known layout."""

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from filelock import FileLock

from jaxkd import models, train
from jaxkd.checkpoint import load_model
from jaxkd.convert import (ConversionError, apply_converted, convert_checkpoint, converter_for,
                           read_state_dict)
from jaxkd.convert import layouts
from jaxkd.convert.timm_import import import_timm
from jaxkd.metric_writer import read_metrics
from jaxkd.models import ModelInfo, UnknownModelError, list_models, registry

from helpers import TINY_VIT, load_script, tiny_config
from timm065_reference import NUM_CLASSES, SMALL as SMALL_065
from timm_parity import assert_close, flat, perturbed, random_images, scaled_tolerance

timm = import_timm()

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
# Where `make venv` installs timm 0.6.5 beside the venv (two timm versions cannot share one).
TIMM065 = os.path.join(REPO, ".venv", "timm065")
SWIN_T = "swin_tiny_patch4_window7_224"
SMALL_SWIN_T = SMALL_065[SWIN_T]


def assert_parity(actual, expected, what):
    """Within PARITY_TOLERANCE of the reference's scale (once it exceeds 1), on a reference the
    perturbed weights keep far from zero."""
    expected = np.asarray(expected)
    assert np.abs(expected).max() > 0.1, f"{what}: reference ~0, the comparison proves nothing"
    assert_close(actual, expected, what, scaled_tolerance(expected))


def convert_file(name, path, **overrides):
    return convert_checkpoint(name, read_state_dict(path), **overrides)


def run_script(name, argv):
    """(exit status, stdout, stderr) of scripts/<name>.py main(argv)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = load_script(name).main(argv)
    return status, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------- converter registry

def test_every_model_registers_a_converter():
    assert all(converter_for(name).name for name in list_models())
    assert converter_for(SWIN_T).layouts == (layouts.SWIN_V1,)
    assert converter_for("resmlp_12_224").layouts == ()


def test_model_without_converter_is_a_clear_error(monkeypatch):
    info = registry.model_info("resnet18")
    monkeypatch.setitem(registry._REGISTRY, "toy_net", ModelInfo("toy_net", "cnn", info.builder))
    with pytest.raises(ConversionError, match="model 'toy_net' has no checkpoint converter"):
        converter_for("toy_net")
    with pytest.raises(UnknownModelError, match="unknown model 'no_such_net'"):
        converter_for("no_such_net")


# ------------------------------------------------------------------ timm 0.6.5 / Microsoft Swin

@pytest.fixture(scope="session")
def timm065(tmp_path_factory, worker_id):
    """Swin checkpoints and outputs written by timm 0.6.5 (tests/timm065_reference.py), once
    per test session: the pytest-xdist workers share one directory, under a file lock."""
    if not os.path.isfile(os.path.join(TIMM065, "timm", "__init__.py")):
        pytest.fail(f"timm 0.6.5 is not installed in {TIMM065}: `make venv` installs it there")
    session_dir = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # each worker's basetemp sits in the session's
        session_dir = session_dir.parent
    out = session_dir / "timm065"
    with FileLock(str(session_dir / "timm065.lock")):
        if not (out / "version.txt").is_file():
            out.mkdir(exist_ok=True)
            result = subprocess.run(
                [sys.executable, os.path.join(TESTS, "timm065_reference.py"), str(out)],
                env={**os.environ, "PYTHONPATH": os.pathsep.join([TIMM065, REPO])},
                capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr
    assert (out / "version.txt").read_text() == "0.6.5"
    return out


def test_registry_evaluates_as_timm065_pretrained_cfgs(timm065):
    """Each model's eval crop and interpolation are those of timm 0.6.5 (the official code's
    timm, whose create_transform evaluates with them); CRD's vgg13 is not timm's."""
    views = {name: view for name, view in
             json.loads((timm065 / "eval_views.json").read_text()).items()
             if converter_for(name).timm_twin}
    assert {"resnet18", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
            "mixer_b16_224", "resnet50"} <= set(views)
    for name, view in views.items():
        info = models.model_info(name)
        assert (info.eval_crop_pct, info.interpolation) == (
            view["crop_pct"], view["interpolation"]), name


@pytest.mark.parametrize("name", list(SMALL_065))
def test_timm065_swin_parity(timm065, name):
    conversion = convert_file(name, timm065 / f"{name}.pth", **SMALL_065[name])
    assert conversion.layout is layouts.SWIN_V1
    assert conversion.num_classes == NUM_CLASSES and conversion.left_out == {}
    logits, features = apply_converted(name, conversion.variables, np.load(timm065 / "images.npy"),
                                       **SMALL_065[name])
    expected = np.load(timm065 / f"{name}.npz")
    assert_parity(logits, expected["logits"], "logits")
    assert_parity(features["embedding"], expected["embedding"], "embedding")


def test_timm065_full_size_swin_t(timm065):
    """The CIFAR-100 teacher's layout at full size: each stage's patch merging moves one stage
    on, the head into head.fc, the stored buffers are not needed."""
    state_dict = read_state_dict(timm065 / "full_swin_tiny.pth")
    variables = flat(convert_file(SWIN_T, timm065 / "full_swin_tiny.pth").variables)
    params = {k: v for k, v in state_dict.items()
              if not k.endswith(("relative_position_index", "attn_mask"))}
    assert sum(v.size for v in variables.values()) == sum(v.size for v in params.values())
    for stage in range(3):
        np.testing.assert_array_equal(
            variables[("params", f"layers_{stage + 1}", "downsample", "reduction", "kernel")],
            state_dict[f"layers.{stage}.downsample.reduction.weight"].T)
    np.testing.assert_array_equal(variables[("params", "head", "kernel")],
                                  state_dict["head.weight"].T)
    assert variables[("params", "head", "bias")].shape == (100,)


@pytest.fixture(scope="module")
def swin065_teacher(timm065, tmp_path_factory):
    """scripts/convert_timm.py run on the timm 0.6.5 Swin-T file: (export dir, stdout)."""
    out = str(tmp_path_factory.mktemp("teacher") / "swin")
    status, stdout, stderr = run_script("convert_timm", [
        "--model", SWIN_T, "--checkpoint", str(timm065 / f"{SWIN_T}.pth"), "--out", out,
        "--overrides", json.dumps(SMALL_SWIN_T)])
    assert status == 0, stderr
    return out, stdout


def test_convert_script_names_the_layout(swin065_teacher):
    out, stdout = swin065_teacher
    assert f"checkpoint layout: {layouts.SWIN_V1.name}" in stdout
    assert re.search(r"parity with timm: max abs logit difference \S+", stdout)
    assert f"{NUM_CLASSES} classes" in stdout
    _, meta = load_model(out)
    assert meta["layout"] == layouts.SWIN_V1.name and meta["num_classes"] == NUM_CLASSES
    assert meta["overrides"] == json.loads(json.dumps(SMALL_SWIN_T))


def test_timm065_swin_teaches_a_distillation_run(swin065_teacher, tmp_path):
    config = tiny_config("kd", data_dir=str(tmp_path / "tfds"),
                         teacher_checkpoint=swin065_teacher[0], steps=2)
    config.dataset.image_size = SMALL_SWIN_T["img_size"]
    config.student.overrides = {**TINY_VIT, "img_size": SMALL_SWIN_T["img_size"]}
    config.teacher.name = SWIN_T
    config.teacher.overrides = dict(SMALL_SWIN_T)
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    metrics = read_metrics(str(tmp_path / "run"))
    losses = [m["train/kd"] for m in metrics if "train/kd" in m]
    assert len(losses) == 2 and all(np.isfinite(losses)) and min(losses) > 0
    assert any("eval/teacher_top1" in m for m in metrics)
    assert 0.0 <= result["eval/top1"] <= 100.0


# ----------------------------------------------------------------------------- Google ViT .npz

SMALL_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3)
DEIT_T = "deit_tiny_patch16_224"


def vit_npz_arrays(sd, style):
    """A timm ViT state dict in the names of google-research/vision_transformer's pre-linen
    code ('vit_jax': encoderblock_{i}, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3)
    or of a scanned big_vision ViT ('big_vision': params/, one encoderblock stacked over depth,
    linen numbering, top-level pos_embedding)."""
    heads, depth = SMALL_VIT["num_heads"], SMALL_VIT["depth"]
    dim = sd["cls_token"].shape[-1]
    big_vision = style == "big_vision"
    attn, norm2, mlp = (("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
                        if big_vision else
                        ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"))

    def block(i):
        b = f"blocks.{i}."
        qkv_w = sd[b + "attn.qkv.weight"].reshape(3, dim, dim)
        qkv_b = sd[b + "attn.qkv.bias"].reshape(3, heads, dim // heads)
        out = {"LayerNorm_0/scale": sd[b + "norm1.weight"],
               "LayerNorm_0/bias": sd[b + "norm1.bias"],
               f"{norm2}/scale": sd[b + "norm2.weight"], f"{norm2}/bias": sd[b + "norm2.bias"],
               f"{attn}/out/kernel": sd[b + "attn.proj.weight"].T.reshape(heads, -1, dim),
               f"{attn}/out/bias": sd[b + "attn.proj.bias"]}
        for j, part in enumerate(("query", "key", "value")):
            out[f"{attn}/{part}/kernel"] = qkv_w[j].T.reshape(dim, heads, -1)
            out[f"{attn}/{part}/bias"] = qkv_b[j]
        for j in range(2):
            out[f"{mlp}/Dense_{j}/kernel"] = sd[b + f"mlp.fc{j + 1}.weight"].T
            out[f"{mlp}/Dense_{j}/bias"] = sd[b + f"mlp.fc{j + 1}.bias"]
        return out

    arrays = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
              "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
              "Transformer/encoder_norm/scale": sd["norm.weight"],
              "Transformer/encoder_norm/bias": sd["norm.bias"],
              "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
    blocks = [block(i) for i in range(depth)]
    if big_vision:
        arrays["pos_embedding"] = sd["pos_embed"]
        arrays.update({f"Transformer/encoderblock/{k}": np.stack([b[k] for b in blocks])
                       for k in blocks[0]})
        return {f"params/{k}": v for k, v in arrays.items()}
    arrays["Transformer/posembed_input/pos_embedding"] = sd["pos_embed"]
    for i, b in enumerate(blocks):
        arrays.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in b.items()})
    return arrays


@pytest.mark.parametrize("style", ["vit_jax", "big_vision"])
def test_google_vit_npz_parity_with_timm_loader(tmp_path, style):
    source = perturbed(timm.create_model(DEIT_T, pretrained=False, num_classes=10, **SMALL_VIT))
    sd = {k: v.numpy() for k, v in source.state_dict().items()}
    path = str(tmp_path / "vit.npz")
    np.savez(path, **vit_npz_arrays(sd, style))
    # The reference: timm's own reader of Google's files, on the same file.
    loaded = timm.create_model(DEIT_T, pretrained=False, num_classes=10, **SMALL_VIT).eval()
    timm.models.vision_transformer._load_weights(loaded, path)
    images_nchw, images = random_images(SMALL_VIT["img_size"])
    with torch.no_grad():
        expected = loaded(images_nchw).numpy()
        assert_parity(expected, source(images_nchw).numpy(), "timm from the .npz")
    conversion = convert_file(DEIT_T, path, **SMALL_VIT)
    assert conversion.layout is layouts.VIT_NPZ
    logits, _ = apply_converted(DEIT_T, conversion.variables, images, **SMALL_VIT)
    assert_parity(logits, expected, "logits")


def test_deit_model_wrapped_release(tmp_path):
    """DeiT's releases are timm state dicts under 'model'."""
    source = perturbed(timm.create_model(DEIT_T, pretrained=False, num_classes=10, **SMALL_VIT))
    torch.save({"model": source.state_dict()}, tmp_path / "deit.pth")
    conversion = convert_file(DEIT_T, tmp_path / "deit.pth", **SMALL_VIT)
    assert conversion.layout is layouts.TIMM
    images_nchw, images = random_images(SMALL_VIT["img_size"])
    logits, _ = apply_converted(DEIT_T, conversion.variables, images, **SMALL_VIT)
    with torch.no_grad():
        assert_parity(logits, source(images_nchw).numpy(), "logits")


# --------------------------------------------------------------------------- Google Mixer .npz

class MlpBlock(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(self.mlp_dim)(x)
        y = nn.gelu(y, approximate=False)
        return nn.Dense(x.shape[-1])(y)


class MixerBlock(nn.Module):
    tokens_mlp_dim: int
    channels_mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x)
        y = jnp.swapaxes(y, 1, 2)
        y = MlpBlock(self.tokens_mlp_dim, name="token_mixing")(y)
        y = jnp.swapaxes(y, 1, 2)
        x = x + y
        y = nn.LayerNorm()(x)
        return x + MlpBlock(self.channels_mlp_dim, name="channel_mixing")(y)


class MlpMixer(nn.Module):
    """google-research/vision_transformer's Mixer (vit_jax/models_mixer.py, the code of the
    released `.npz` files, whose parameter tree they are). One deliberate difference: the exact
    GELU, with which timm (and jaxkd) run those weights, for the original's tanh approximation."""

    patch: int
    num_classes: int
    num_blocks: int
    hidden_dim: int
    tokens_mlp_dim: int
    channels_mlp_dim: int

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.hidden_dim, (self.patch, self.patch), strides=self.patch,
                    name="stem")(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        for _ in range(self.num_blocks):
            x = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim)(x)
        x = nn.LayerNorm(name="pre_head_layer_norm")(x).mean(axis=1)
        return nn.Dense(self.num_classes, name="head")(x)


SMALL_MIXER = dict(img_size=32, patch_size=8, embed_dim=48, num_blocks=4)
MIXER = "mixer_b16_224"


def test_google_mixer_npz_parity_with_original_code(tmp_path):
    original = MlpMixer(patch=8, num_classes=10, num_blocks=4, hidden_dim=48,
                        tokens_mlp_dim=24, channels_mlp_dim=192)  # timm's mlp_ratio (0.5, 4)
    _, images = random_images(SMALL_MIXER["img_size"])
    shapes = jax.eval_shape(original.init, jax.random.PRNGKey(0), images)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: rng.normal(0.0, leaf.shape[0] ** -0.5 if path[-1].key == "kernel"
                                      else 0.5, leaf.shape).astype(np.float32)
        + (1.0 if path[-1].key == "scale" else 0.0), shapes)
    path = str(tmp_path / "mixer.npz")
    np.savez(path, **flax.traverse_util.flatten_dict(params["params"], sep="/"))
    assert "MixerBlock_3/token_mixing/Dense_1/kernel" in np.load(path).files
    conversion = convert_file(MIXER, path, **SMALL_MIXER)
    assert conversion.layout is layouts.MIXER_NPZ
    logits, _ = apply_converted(MIXER, conversion.variables, images, **SMALL_MIXER)
    assert_parity(logits, jax.jit(original.apply)(params, images), "logits")


# ------------------------------------------------------------------- Facebook's ConvNeXt release

SMALL_CONVNEXT = dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40))


def facebook_convnext_key(key):
    """A timm ConvNeXt key in facebookresearch/ConvNeXt's module names: downsample_layers[0] is
    the stem, downsample_layers[i] = (LayerNorm, Conv) before stage i, stages[i][j] are blocks
    (dwconv, norm, pwconv1, pwconv2, gamma), `norm` follows the pooling, `head` is a Linear."""
    for pattern, replacement in (
            (r"^stem\.(\d)\.", r"downsample_layers.0.\1."),
            (r"^stages\.(\d)\.downsample\.(\d)\.", r"downsample_layers.\1.\2."),
            (r"^stages\.(\d)\.blocks\.(\d+)\.conv_dw\.", r"stages.\1.\2.dwconv."),
            (r"^stages\.(\d)\.blocks\.(\d+)\.mlp\.fc(\d)\.", r"stages.\1.\2.pwconv\3."),
            (r"^stages\.(\d)\.blocks\.(\d+)\.", r"stages.\1.\2."),
            (r"^head\.norm\.", "norm."),
            (r"^head\.fc\.", "head.")):
        key, found = re.subn(pattern, replacement, key)
        if found:
            return key
    raise AssertionError(f"no Facebook name for {key}")


def test_facebook_convnext_release(tmp_path):
    source = perturbed(timm.create_model("convnext_tiny", pretrained=False, num_classes=10,
                                         **SMALL_CONVNEXT))
    release = {facebook_convnext_key(k): v for k, v in source.state_dict().items()}
    assert {"downsample_layers.0.1.weight", "downsample_layers.3.1.weight", "stages.2.1.gamma",
            "stages.2.1.pwconv2.bias", "norm.weight", "head.weight"} <= release.keys()
    torch.save({"model": release}, tmp_path / "convnext_tiny_1k_224_ema.pth")
    conversion = convert_file("convnext_tiny", tmp_path / "convnext_tiny_1k_224_ema.pth",
                              **SMALL_CONVNEXT)
    assert conversion.layout is layouts.FB_CONVNEXT
    images_nchw, images = random_images(32)
    logits, _ = apply_converted("convnext_tiny", conversion.variables, images, **SMALL_CONVNEXT)
    with torch.no_grad():
        assert_parity(logits, source(images_nchw).numpy(), "logits")


# ------------------------------------------------------------------------------- MoCo ResNet-50

SMALL_RESNET50 = dict(layers=(1, 1, 1, 1))


def moco_checkpoint(backbone, path):
    """main_moco.py's checkpoint of a MoCo v2 run (DDP): query and key encoders, each a
    torchvision ResNet whose fc is the 2-layer projection MLP, and the queue of negatives."""
    dim = backbone.num_features
    mlp = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(), torch.nn.Linear(dim, 128))
    encoder = {**backbone.state_dict(), **{f"fc.{k}": v for k, v in mlp.state_dict().items()}}
    state = {f"module.encoder_{part}.{k}": v.clone() for part in "qk" for k, v in encoder.items()}
    state.update({"module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1)})
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": state}, path)
    return encoder


def test_moco_v2_resnet50_backbone_without_classifier(tmp_path):
    backbone = perturbed(timm.create_model("resnet50", pretrained=False, num_classes=0,
                                           **SMALL_RESNET50))
    path = str(tmp_path / "moco_v2_200ep_pretrain.pth.tar")
    encoder = moco_checkpoint(backbone, path)
    conversion = convert_file("resnet50", path, **SMALL_RESNET50)
    assert conversion.layout is layouts.MOCO and conversion.num_classes == 0
    assert "head" not in conversion.variables["params"]
    left_out = conversion.left_out
    assert sorted(left_out["projection MLP (not a classifier)"]) == [
        "encoder_q.fc.0.bias", "encoder_q.fc.0.weight", "encoder_q.fc.2.bias",
        "encoder_q.fc.2.weight"]
    assert len(left_out["momentum (key) encoder"]) == len(encoder)
    assert sorted(left_out["queue of negatives"]) == ["queue", "queue_ptr"]
    images_nchw, images = random_images(32)
    logits, features = apply_converted("resnet50", conversion.variables, images,
                                       **SMALL_RESNET50)
    assert logits is None
    with torch.no_grad():
        assert_parity(features["embedding"], backbone(images_nchw).numpy(), "embedding")

    # The script writes a headless export (num_classes 0), which exports back to timm's
    # num_classes=0 model.
    out = str(tmp_path / "moco_teacher")
    status, stdout, stderr = run_script("convert_timm", [
        "--model", "resnet50", "--checkpoint", path, "--out", out,
        "--overrides", json.dumps(SMALL_RESNET50)])
    assert status == 0, stderr
    assert f"checkpoint layout: {layouts.MOCO.name}" in stdout
    assert "left out, momentum (key) encoder" in stdout and "no classifier" in stdout
    assert "parity with timm: max abs embedding difference" in stdout
    variables, meta = load_model(out)
    assert meta["num_classes"] == 0 and meta["left_out"]["queue of negatives"] == 2
    exported = str(tmp_path / "moco_r50.safetensors")
    status, stdout, stderr = run_script("export_timm", ["--checkpoint", out, "--out", exported])
    assert status == 0, stderr
    assert "strict=True" in stdout


def test_moco_backbone_with_a_fresh_classifier():
    """A classifier for the backbone (linear evaluation) only on request."""
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0)
    sd = {f"module.encoder_q.{k}": v for k, v in backbone.state_dict().items()}
    sd.update({"module.encoder_q.fc.0.weight": torch.zeros(512, 512),
               "module.encoder_q.fc.0.bias": torch.zeros(512)})
    with pytest.raises(ConversionError, match="reinit_head=True") as error:
        convert_checkpoint("resnet18", sd, num_classes=5)
    assert "params/head/kernel <- fc.weight" in str(error.value)
    variables = flat(convert_checkpoint("resnet18", sd, num_classes=5, reinit_head=True).variables)
    assert variables[("params", "head", "kernel")].shape == (512, 5)
    assert np.std(variables[("params", "head", "kernel")]) > 0
    np.testing.assert_array_equal(variables[("params", "layer4_1", "conv2", "kernel")],
                                  sd["module.encoder_q.layer4.1.conv2.weight"].numpy()
                                  .transpose(2, 3, 1, 0))


def test_keys_that_normalise_to_the_same_key_are_an_error():
    sd = {"module.encoder_q.conv1.weight": np.zeros((64, 3, 7, 7), np.float32),
          "conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}
    with pytest.raises(ConversionError, match="'module.encoder_q.conv1.weight' and "
                                              "'conv1.weight' both become 'conv1.weight'"):
        convert_checkpoint("resnet50", sd)


# ---------------------------------------------------------------------- a file of no known layout

def test_unknown_layout_is_one_error_listing_both_sides(tmp_path):
    """A ResNet file given for Swin: no KeyError, one message with every unmatched key."""
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=10)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    status, stdout, stderr = run_script("convert_timm", [
        "--model", SWIN_T, "--checkpoint", str(tmp_path / "resnet18.pth"),
        "--out", str(tmp_path / "out"), "--overrides", json.dumps(SMALL_SWIN_T)])
    assert status == 1 and stderr.startswith("error: ") and "Traceback" not in stderr
    assert "KeyError" not in stderr and not os.path.exists(tmp_path / "out")
    assert "none of the layouts read for this model" in stderr
    assert layouts.SWIN_V1.name in stderr
    assert "num_classes unknown: the checkpoint has no 'head.fc.weight'" in stderr
    assert "params/layers_0/blocks_0/attn/qkv/kernel <- layers.0.blocks.0.attn.qkv.weight" in stderr
    assert all(f"\n    {key}\n" in stderr + "\n" for key in resnet.state_dict()
               if not key.endswith("num_batches_tracked"))


def test_claimed_layout_that_does_not_fit_is_named(timm065):
    """A timm 0.6.5 file with a key missing is still read as one, and the error says so."""
    state_dict = read_state_dict(timm065 / f"{SWIN_T}.pth")
    del state_dict["layers.1.downsample.norm.weight"]
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(SWIN_T, state_dict, **SMALL_SWIN_T)
    message = str(error.value)
    assert f"read as {layouts.SWIN_V1.name}" in message
    assert "params/layers_2/downsample/norm/scale <- layers.2.downsample.norm.weight" in message
