"""Checkpoint file readers (every format written here by torch/safetensors, every refusal) and
the convert/export scripts built on them."""

import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy_safetensors
from safetensors.torch import save_file as save_torch_safetensors

from jaxkd.checkpoint import load_model
from jaxkd.convert import (
    CheckpointReadError,
    read_state_dict,
    state_dict_from_timm_model,
    timm_to_flax,
)
from jaxkd.convert.timm_import import import_timm
from jaxkd.errors import CheckpointError

from helpers import load_script


@pytest.fixture
def state_dict():
    generator = torch.Generator().manual_seed(0)
    return {"conv.weight": torch.randn(4, 3, 3, 3, generator=generator),
            "bn.weight": torch.rand(4, generator=generator),
            "bn.running_var": torch.rand(4, generator=generator) + 0.5,
            "bn.num_batches_tracked": torch.tensor(7),
            "fc.bias": torch.randn(10, generator=generator).half()}


def _assert_same(read, expected):
    assert read.keys() == expected.keys()
    for key, tensor in expected.items():
        assert isinstance(read[key], np.ndarray)
        assert read[key].dtype == tensor.numpy().dtype
        np.testing.assert_array_equal(read[key], tensor.numpy())


def _leave_marker(path):
    """What a malicious pickle would run: proves whether unpickling executed code."""
    with open(path, "w") as f:
        f.write("code ran")
    return path


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _leave_marker, (self.marker,)


def test_safetensors(tmp_path, state_dict):
    path = tmp_path / "weights.safetensors"
    save_torch_safetensors(state_dict, str(path))
    _assert_same(read_state_dict(str(path)), state_dict)


def test_safetensors_bfloat16_widens_to_float32(tmp_path, state_dict):
    state_dict["conv.weight"] = state_dict["conv.weight"].bfloat16()
    path = tmp_path / "weights.safetensors"
    save_torch_safetensors(state_dict, str(path))
    read = read_state_dict(path)
    assert read["conv.weight"].dtype == np.float32
    np.testing.assert_array_equal(read["conv.weight"], state_dict["conv.weight"].float().numpy())
    np.testing.assert_array_equal(read["bn.weight"], state_dict["bn.weight"].numpy())


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".pth.tar"])
def test_torch_files(tmp_path, state_dict, suffix):
    path = tmp_path / f"weights{suffix}"
    torch.save(state_dict, path)
    _assert_same(read_state_dict(str(path)), state_dict)


def test_torch_bfloat16_widens_to_float32(tmp_path, state_dict):
    path = tmp_path / "weights.pth"
    torch.save({"w": state_dict["conv.weight"].bfloat16()}, path)
    read = read_state_dict(path)
    assert read["w"].dtype == np.float32
    np.testing.assert_array_equal(read["w"], state_dict["conv.weight"].bfloat16().float().numpy())


@pytest.mark.parametrize("wrapper", ["model", "state_dict", "model_ema"])
def test_wrapped_training_checkpoints(tmp_path, state_dict, wrapper):
    path = tmp_path / "checkpoint.pth"
    torch.save({wrapper: state_dict, "epoch": 299, "best_acc": 89.26}, path)
    _assert_same(read_state_dict(path), state_dict)


def test_raw_weights_preferred_over_ema(tmp_path, state_dict):
    ema = {k: v + 1 for k, v in state_dict.items()}
    path = tmp_path / "checkpoint.pth"
    torch.save({"model_ema": ema, "model": state_dict}, path)
    _assert_same(read_state_dict(path), state_dict)


def test_ddp_module_prefix_is_stripped(tmp_path, state_dict):
    path = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state_dict.items()}}, path)
    _assert_same(read_state_dict(path), state_dict)


def test_pickled_code_is_refused_and_never_runs(tmp_path, state_dict):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({**state_dict, "payload": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointReadError, match="arbitrary code"):
        read_state_dict(path)
    assert not marker.exists()
    # The payload is live: an unrestricted load does run it.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


def test_npz_files(tmp_path, state_dict):
    """Google's parameter files: a Flax tree flattened with '/' by np.savez."""
    arrays = {f"Transformer/encoderblock_0/{k}": v.numpy() for k, v in state_dict.items()}
    np.savez(tmp_path / "ViT-B_16.npz", **arrays)
    read = read_state_dict(tmp_path / "ViT-B_16.npz")
    assert read.keys() == arrays.keys()
    for key, value in arrays.items():
        assert read[key].dtype == value.dtype
        np.testing.assert_array_equal(read[key], value)


def test_npz_pickled_objects_are_refused_and_never_run(tmp_path, state_dict):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.npz"
    payload = np.empty(1, dtype=object)
    payload[0] = _Payload(str(marker))
    np.savez(path, weights=state_dict["conv.weight"].numpy(), payload=payload)
    with pytest.raises(CheckpointReadError, match="arbitrary code"):
        read_state_dict(path)
    assert not marker.exists()
    np.load(path, allow_pickle=True)["payload"]  # The payload is live: unpickling runs it.
    assert marker.read_text() == "code ran"


def test_npz_holding_one_array(tmp_path):
    path = tmp_path / "array.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(CheckpointReadError, match="not an .npz archive"):
        read_state_dict(path)


def _write(state_dict, path):
    """`state_dict` saved as its extension says."""
    if path.suffix == ".pth":
        torch.save(state_dict, path)
    elif path.suffix == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in state_dict.items()})
    else:
        save_torch_safetensors(state_dict, str(path))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".npz"])
def test_truncated_file(tmp_path, state_dict, suffix):
    path = tmp_path / f"weights{suffix}"
    _write(state_dict, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointReadError, match="corrupt or truncated"):
        read_state_dict(path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".npz"])
def test_garbage_file(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(b"this is not a checkpoint at all" * 4)
    with pytest.raises(CheckpointReadError, match="corrupt or truncated") as error:
        read_state_dict(path)
    assert "\n" not in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointReadError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")


def test_unknown_extension(tmp_path, state_dict):
    path = tmp_path / "weights.h5"
    path.write_bytes(b"not read")
    with pytest.raises(CheckpointReadError, match="unknown checkpoint extension"):
        read_state_dict(path)


def test_no_tensors(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "arch": "resnet18"}, path)
    with pytest.raises(CheckpointReadError, match="no tensors found") as error:
        read_state_dict(path)
    assert "'arch'" in str(error.value) and "'epoch'" in str(error.value)
    empty = tmp_path / "empty.safetensors"
    save_numpy_safetensors({}, str(empty))
    with pytest.raises(CheckpointReadError, match="no tensors found"):
        read_state_dict(empty)


def test_not_a_state_dict(tmp_path, state_dict):
    listed = tmp_path / "list.pth"
    torch.save(list(state_dict.values()), listed)
    with pytest.raises(CheckpointReadError, match="holds a list"):
        read_state_dict(listed)
    mixed = tmp_path / "mixed.pth"
    torch.save({**state_dict, "epoch": 3}, mixed)
    with pytest.raises(CheckpointReadError, match="'epoch'"):
        read_state_dict(mixed)


def test_error_classes():
    assert issubclass(CheckpointReadError, ValueError)
    assert issubclass(CheckpointReadError, CheckpointError)
    assert not issubclass(pickle.UnpicklingError, CheckpointReadError)


def test_timm_model_state_dict_through_file_to_flax(tmp_path):
    timm = import_timm()
    kw = {"depths": (1, 1, 1, 1), "dims": (8, 8, 16, 16)}
    model = timm.create_model("convnext_tiny", pretrained=False, num_classes=3, **kw)
    live = state_dict_from_timm_model(model)
    assert live.keys() == model.state_dict().keys()
    assert all(isinstance(v, np.ndarray) for v in live.values())
    path = os.path.join(tmp_path, "convnext.safetensors")
    save_torch_safetensors(model.state_dict(), path)
    from_file = read_state_dict(path)
    assert from_file.keys() == live.keys()
    variables = timm_to_flax("convnext_tiny", from_file, **kw)
    np.testing.assert_array_equal(variables["params"]["head"]["kernel"],
                                  model.head.fc.weight.detach().numpy().T)


# ------------------------------------------------- scripts/convert_timm.py, scripts/export_timm.py

def test_convert_and_export_scripts(tmp_path, capsys):
    convert, export = load_script("convert_timm"), load_script("export_timm")
    timm = import_timm()
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=7)
    source = tmp_path / "teacher.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, source)

    teacher = str(tmp_path / "teacher")
    assert convert.main(["--model", "resnet18", "--checkpoint", str(source), "--out", teacher]) == 0
    out = capsys.readouterr().out
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in out
    assert "parity with timm: max abs logit difference" in out
    variables, meta = load_model(teacher)
    assert (meta["model_name"], meta["num_classes"], meta["overrides"]) == ("resnet18", 7, {})
    torch_kernel = model.layer2[0].conv1.weight.detach().numpy()
    np.testing.assert_array_equal(variables["params"]["layer2_0"]["conv1"]["kernel"],
                                  torch_kernel.transpose(2, 3, 1, 0))

    exported = str(tmp_path / "resnet18.safetensors")
    assert export.main(["--checkpoint", teacher, "--out", exported]) == 0
    assert "strict=True" in capsys.readouterr().out
    fresh = timm.create_model("resnet18", pretrained=False, num_classes=7)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in read_state_dict(exported).items()},
                          strict=True)
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)

    cifar = str(tmp_path / "cifar")
    assert convert.main(["--model", "resnet18", "--checkpoint", str(source), "--out", cifar,
                         "--num-classes", "3", "--reinit-head"]) == 0
    assert load_model(cifar)[1]["num_classes"] == 3


@pytest.mark.parametrize("argv,message", [
    (["--model", "resnet18", "--checkpoint", "missing.pth"], "does not exist"),
    (["--model", "no_such_net", "--checkpoint", "{state}"], "unknown model 'no_such_net'"),
    (["--model", "resnet18", "--checkpoint", "{state}", "--num-classes", "3"], "fc.weight"),
    (["--model", "mobilenetv2_100", "--checkpoint", "{state}"], "classifier.weight"),
])
def test_convert_script_errors_are_one_message(tmp_path, capsys, state_dict, argv, message):
    state = tmp_path / "tiny_resnet.safetensors"
    sd = dict(state_dict)
    sd["fc.weight"] = torch.zeros(7, 512)
    save_torch_safetensors(sd, str(state))
    argv = [a.replace("{state}", str(state)) for a in argv] + ["--out", str(tmp_path / "out")]
    assert load_script("convert_timm").main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "out")


def test_export_script_errors(tmp_path, capsys):
    export = load_script("export_timm")
    assert export.main(["--checkpoint", str(tmp_path / "none"), "--out", "x.safetensors"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert export.main(["--checkpoint", str(tmp_path), "--out", "x.pth"]) == 1
    assert ".safetensors" in capsys.readouterr().err
