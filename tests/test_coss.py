"""CoSS: the neighbour index and sampler, the unsupervised method, probes and a tiny run."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import data, distill, losses, train
from jaxkd.analysis import probe
from jaxkd.data import neighbours
from jaxkd.errors import ConfigError
from jaxkd.metric_writer import read_metrics

from helpers import apply_method, init_method, load_script, random_teacher, tiny_config

RESNET_OVERRIDES = {"layers": (1, 1, 1, 1)}


def _brute_force_top_k(x, k):
    x = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    similarity = x @ x.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k], similarity


def test_index_matches_brute_force_cosine_top_k():
    x = np.random.default_rng(0).normal(size=(150, 12)).astype(np.float32)
    x[:, 0] *= 10.0  # cosine, not dot product: row norms must not matter
    index = neighbours.top_k_neighbours(x, 7, chunk_size=64)  # 3 chunks, the last padded
    reference, similarity = _brute_force_top_k(x, 7)
    assert index.shape == (150, 7) and index.dtype == np.int32
    assert not np.any(index == np.arange(150)[:, None])
    # Same neighbours; where similarities tie to float32 precision the order may differ.
    np.testing.assert_allclose(np.take_along_axis(similarity, index, 1),
                               np.take_along_axis(similarity, reference, 1), atol=1e-6)
    assert np.mean(index == reference) > 0.99


def test_index_is_saved_and_reused(tmp_path):
    x = np.random.default_rng(1).normal(size=(40, 5)).astype(np.float32)
    calls = []
    build = lambda: calls.append(1) or x
    path = neighbours.index_path(str(tmp_path), 6)
    first = neighbours.load_or_build_index(path, 6, 40, build)
    again = neighbours.load_or_build_index(path, 6, 40, build)
    assert len(calls) == 1
    np.testing.assert_array_equal(first, again)
    assert os.path.exists(path)


def test_sampler_groups_are_anchor_plus_distinct_pool_neighbours():
    index = neighbours.top_k_neighbours(
        np.random.default_rng(2).normal(size=(100, 8)).astype(np.float32), 12)
    anchors_seen = []
    for step in range(100 // 6):  # one pass over the anchors
        ids = neighbours.batch_example_ids(index, step=step, anchors=6, num_neighbours=4,
                                           neighbour_pool=9, seed=3)
        assert ids.shape == (6, 5)
        for row in ids:
            assert len(set(row[1:])) == 4  # without replacement
            assert set(row[1:]) <= set(index[row[0], :9])
        anchors_seen.extend(ids[:, 0])
        np.testing.assert_array_equal(ids, neighbours.batch_example_ids(
            index, step=step, anchors=6, num_neighbours=4, neighbour_pool=9, seed=3))
    assert len(set(anchors_seen)) == len(anchors_seen)  # each example anchors once per pass
    # Over many passes an anchor draws from its whole pool, and only from it.
    drawn = np.concatenate([neighbours.batch_example_ids(
        index, step=s, anchors=6, num_neighbours=4, neighbour_pool=9, seed=3)
        for s in range(300)])
    rows = drawn[drawn[:, 0] == drawn[0, 0]]
    assert set(rows[:, 1:].ravel()) == set(index[drawn[0, 0], :9])


def test_neighbour_batches_serve_the_indexed_images(digits_dir, tmp_path):
    dataset = data.open_dataset("sklearn_digits", digits_dir)
    ordered = list(dataset.centre_crop_train_batches(image_size=16, batch_size=500))
    assert [len(b["mask"]) for b in ordered] == [500] * 3  # the last one padded
    keep = np.concatenate([b["mask"] for b in ordered]) > 0
    images = np.concatenate([b["image"] for b in ordered])[keep]
    labels = np.concatenate([b["label"] for b in ordered])[keep]
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in ordered])[keep],
                                  np.arange(1437))
    np.testing.assert_array_equal(labels, dataset.train_labels())
    index = neighbours.top_k_neighbours(images.reshape(len(images), -1), 10)
    sampler = data.NeighbourSampler(data.TrainData(16, 16, 0, None),
                                    index_path=str(tmp_path / "index.npy"), index_size=10,
                                    num_neighbours=3, neighbour_pool=5)
    with pytest.raises(ConfigError, match="no neighbour index at .*index.npy: the sampler's "
                                          "prepare step builds it"):
        sampler.batches(dataset)
    with pytest.raises(ConfigError, match="needs a teacher"):
        sampler.prepare(dataset, embed_fn=None, batch_size=500)
    # Prepared from an embedding that is the image itself: the same index.
    sampler.prepare(dataset, embed_fn=lambda x: x.reshape(len(x), -1), batch_size=500)
    np.testing.assert_array_equal(np.load(sampler.index_path), index)
    batches = sampler.batches(dataset, process_index=1, process_count=2, start_step=2)
    batch = next(batches)
    expected = neighbours.batch_example_ids(index, step=2, anchors=4, num_neighbours=3,
                                            neighbour_pool=5, seed=0)[2:].reshape(-1)
    np.testing.assert_array_equal(batch["index"], expected)
    np.testing.assert_allclose(batch["image"], images[expected], atol=1e-6)
    np.testing.assert_array_equal(batch["label"], labels[expected])
    assert batch["image"].shape == (8, 16, 16, 3)


def _coss_module(student_dim, teacher_dim, stats_groups=1):
    spec = lambda dim: distill.ModelSpec("m", 10, dim, (), token_stages=False)
    config = distill.method_config("coss", hidden_dim=16, stats_groups=stats_groups)
    ctx = distill.MethodContext(num_devices=8, label_smoothing=0.0)
    return distill.create_method(config, spec(student_dim), spec(teacher_dim), ctx)


def test_coss_method_loss_and_labels_unused():
    rng = np.random.default_rng(4)
    student = (jnp.zeros((8, 10)), {"embedding": jnp.asarray(rng.normal(size=(8, 6)))})
    teacher = (jnp.zeros((8, 10)), {"embedding": jnp.asarray(rng.normal(size=(8, 12)))})
    batch = {"image": jnp.zeros((8, 4, 4, 3)), "label": jnp.arange(8) % 10,
             "index": jnp.arange(8)}
    method = _coss_module(6, 12, stats_groups=2)
    variables = init_method(method, jax.random.PRNGKey(0), student, teacher, batch,
                            train=False)
    (loss, metrics), _ = apply_method(method, variables, student, teacher, batch, train=True,
                                      mutable=[])
    head = variables["params"]["head"]
    mapped = jax.nn.relu(student[1]["embedding"] @ head["Dense_0"]["kernel"] +
                         head["Dense_0"]["bias"]) @ head["Dense_1"]["kernel"] + \
        head["Dense_1"]["bias"]
    halves = [losses.coss_loss(mapped[i:i + 4], teacher[1]["embedding"][i:i + 4])
              for i in (0, 4)]
    np.testing.assert_allclose(loss, np.mean(halves), rtol=1e-5)
    assert metrics["coss"] == loss
    shuffled = {**batch, "label": batch["label"][::-1]}
    no_labels = {k: v for k, v in batch.items() if k != "label"}
    for other in (shuffled, no_labels):
        (other_loss, _), _ = apply_method(method, variables, student, teacher, other,
                                          train=True, mutable=[])
        assert float(other_loss) == float(loss)
    same_width = _coss_module(12, 12)
    assert "head" not in init_method(same_width, jax.random.PRNGKey(0), teacher, teacher,
                                     batch, train=False).get("params", {})


def test_knn_and_linear_probe_on_separable_toy_set():
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(3, 16)) * 5.0
    labels = rng.integers(0, 3, size=300)
    points = centres[labels] + rng.normal(size=(300, 16))
    train_x, train_y, test_x, test_y = points[:200], labels[:200], points[200:], labels[200:]
    assert probe.knn_top1(train_x, train_y, test_x, test_y, k=5) == 100.0
    assert probe.linear_probe_top1(train_x, train_y, test_x, test_y, num_classes=3,
                                   epochs=20, batch_size=50, lr=1e-2) == 100.0
    # Plain majority vote against a NumPy k-NN on overlapping classes.
    noisy = rng.normal(size=(300, 4)) + labels[:, None] * 0.3
    sims = (noisy[200:] / np.linalg.norm(noisy[200:], axis=1, keepdims=True)) @ \
        (noisy[:200] / np.linalg.norm(noisy[:200], axis=1, keepdims=True)).T
    top = np.argsort(-sims, axis=1)[:, :7]
    votes = np.stack([np.bincount(train_y[t], minlength=3) for t in top])
    expected = 100.0 * np.mean(np.argmax(votes, 1) == test_y)
    assert probe.knn_top1(noisy[:200], train_y, noisy[200:], test_y, k=7,
                          temperature=0.0) == pytest.approx(expected)


def test_coss_end_to_end_with_neighbour_sampler(tmp_path, digits_dir):
    # A headless backbone teaches, as CoSS's MoCo-v2 ResNet-50 does: an export without a
    # classifier (num_classes 0, what convert_timm.py writes for a MoCo checkpoint).
    teacher = random_teacher(str(tmp_path / "teacher"), 0, name="resnet18",
                             overrides=RESNET_OVERRIDES)
    config = tiny_config("coss", data_dir=digits_dir, teacher_checkpoint=teacher, steps=2,
                         hidden_dim=64)
    config.teacher.name = "resnet18"
    config.teacher.overrides = dict(RESNET_OVERRIDES)
    config.dataset.update(num_neighbours=3, neighbour_pool=5, index_size=8)
    config.eval_batch_size = 256  # also the batch of the teacher's pass over the train split
    workdir = str(tmp_path / "run")
    result = train.train_and_evaluate(config, workdir)
    metrics = [m for m in read_metrics(workdir) if "train/loss" in m]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["train/coss"]) and "train/top1" not in m for m in metrics)
    # Evaluated by k-NN on the embedding, not by the head no loss trained; a headless teacher
    # has no top-1 of its own.
    assert "eval/top1" not in result and "eval/teacher_top1" not in result
    from jaxkd.analysis.representations import load_export

    student = load_export(os.path.join(workdir, "export"))
    embed = jax.jit(lambda x: student.module.apply(
        student.variables, (x - student.mean) / student.std)[1]["embedding"])
    dataset = data.open_dataset("sklearn_digits", digits_dir)
    train_split = probe.embed_batches(embed, dataset.centre_crop_train_batches(
        image_size=16, batch_size=256))
    eval_split = probe.embed_batches(embed, dataset.eval_batches(global_batch_size=256,
                                                                 image_size=16))
    expected = probe.knn_top1(*train_split, *eval_split, num_classes=10)
    # The same vote on embeddings from another compiled program: at most one of the 360
    # test images may flip.
    assert abs(result["eval/knn_top1"] - expected) <= 100 / 360 + 1e-9
    index = np.load(neighbours.index_path(workdir, 8))
    assert index.shape == (1437, 8)
    assert not np.any(index == np.arange(1437)[:, None])
    # A method that reads the teacher's logits cannot use that teacher.
    kd = tiny_config("kd", data_dir=digits_dir, teacher_checkpoint=teacher, steps=1)
    kd.teacher.name, kd.teacher.overrides = "resnet18", dict(RESNET_OVERRIDES)
    with pytest.raises(ConfigError, match="without a classifier head.*reads the teacher's"):
        train.train_and_evaluate(kd, str(tmp_path / "kd"))


def test_probe_script_on_a_model_export(tmp_path, digits_dir):
    import json

    script = load_script("probe")
    model_dir = random_teacher(str(tmp_path / "model"), 10)
    out = str(tmp_path / "probe.json")
    assert script.main(["--model", model_dir, "--dataset", "sklearn_digits", "--data-dir",
                        digits_dir, "--image-size", "16", "--linear-epochs", "3",
                        "--out", out]) == 0
    with open(out) as f:
        result = json.load(f)
    # Against the probe on embeddings computed here directly from the model.
    from jaxkd.analysis.representations import load_export

    model = load_export(model_dir)
    embed = lambda batches: [np.concatenate(x) for x in zip(*[
        (np.asarray(model.module.apply(model.variables, (b["image"] - model.mean) / model.std)
                    [1]["embedding"])[b["mask"] > 0], b["label"][b["mask"] > 0])
        for b in batches])]
    dataset = data.open_dataset("sklearn_digits", digits_dir)
    train_x, train_y = embed(dataset.centre_crop_train_batches(image_size=16, batch_size=256))
    test_x, test_y = embed(dataset.eval_batches(global_batch_size=256, image_size=16))
    assert (len(train_y), len(test_y)) == (1437, 360)
    assert result["knn_top1"] == pytest.approx(probe.knn_top1(train_x, train_y, test_x, test_y,
                                                              num_classes=10), abs=0.3)
    assert 0.0 <= result["linear_top1"] <= 100.0
