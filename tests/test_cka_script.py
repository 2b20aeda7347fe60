"""scripts/cka.py on two tiny random model exports and the embedded digits."""

import json
import os

import numpy as np

from jaxkd import data
from jaxkd.analysis.representations import layer_names, load_export

from helpers import load_script, random_teacher, tiny_config

RESNET_OVERRIDES = {"layers": (1, 1, 1, 1)}
LAYER_NAMES = layer_names(4)  # DeiT's and ResNet's four stages, then the embedding


def _numpy_cka(x, y):
    """Feature-space linear CKA in float64."""
    x = x.reshape(len(x), -1).astype(np.float64)
    y = y.reshape(len(y), -1).astype(np.float64)
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_cka_script_on_two_exports(tmp_path):
    cka = load_script("cka")
    teacher = random_teacher(str(tmp_path / "teacher"), 10)
    student = random_teacher(str(tmp_path / "student"), 10, name="resnet18",
                             overrides=RESNET_OVERRIDES, seed=2)
    data_dir = str(tmp_path / "tfds")
    common = ["--dataset", "sklearn_digits", "--data-dir", data_dir, "--image-size", "16",
              "--num-examples", "100", "--batch-size", "32"]
    out = str(tmp_path / "cka")
    assert cka.main(["--teacher", teacher, "--student", student, "--out", out, *common]) == 0
    with open(os.path.join(out, "cka.json")) as f:
        result = json.load(f)
    matrix = np.array(result["cka"])
    assert matrix.shape == (len(LAYER_NAMES), len(LAYER_NAMES))
    assert result["num_examples"] == 100
    assert np.all((matrix >= 0.0) & (matrix <= 1.0 + 1e-6))
    assert os.path.getsize(os.path.join(out, "cka.png")) > 0

    # The embedding-vs-embedding entry against a NumPy reference on the same 100 images.
    images = np.concatenate([b["image"] for b in data.open_dataset(
        "sklearn_digits", data_dir).eval_batches(global_batch_size=100, image_size=16)])[:100]
    embeddings = []
    for path in (teacher, student):
        model = load_export(path)
        _, features = model.module.apply(model.variables, (images - model.mean) / model.std)
        embeddings.append(np.asarray(features["embedding"]))
    np.testing.assert_allclose(matrix[-1, -1], _numpy_cka(*embeddings), atol=1e-5)

    same = str(tmp_path / "same")
    assert cka.main(["--teacher", teacher, "--student", teacher, "--out", same, *common]) == 0
    with open(os.path.join(same, "cka.json")) as f:
        self_matrix = np.array(json.load(f)["cka"])
    np.testing.assert_allclose(np.diag(self_matrix), 1.0, atol=1e-5)
    np.testing.assert_allclose(self_matrix, self_matrix.T, atol=1e-5)


def test_cka_evaluation_during_training(tmp_path):
    """`eval_cka_examples` logs per-stage teacher-student CKA equal to the CKA of the two
    models' features on the same eval images."""
    from jaxkd import train
    from jaxkd.analysis.representations import cka_matrix, collect_features
    from jaxkd.metric_writer import read_metrics

    teacher = random_teacher(str(tmp_path / "teacher"), 10)
    config = tiny_config("kd", data_dir=str(tmp_path / "tfds"), teacher_checkpoint=teacher,
                         steps=1)
    config.eval_cka_examples = 100
    workdir = str(tmp_path / "run")
    result = train.train_and_evaluate(config, workdir)
    logged = [m for m in read_metrics(workdir) if "eval/cka_stage1" in m]
    assert len(logged) == 1 and logged[0]["step"] == 1
    features = collect_features([load_export(teacher), load_export(str(tmp_path / "run" /
                                                                       "export"))],
                                "sklearn_digits", image_size=16, num_examples=100,
                                data_dir=str(tmp_path / "tfds"))
    expected = np.diag(cka_matrix(*features))
    np.testing.assert_allclose([result[f"eval/cka_{name}"] for name in LAYER_NAMES], expected,
                               atol=1e-5)
