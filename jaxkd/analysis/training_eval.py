"""Evaluations the trainer runs besides top-1: k-NN top-1 of an unsupervised student's
embedding (CoSS's head is never trained) and the teacher-student linear CKA per stage."""

from __future__ import annotations

from typing import Callable

from jaxkd.analysis import probe
from jaxkd.analysis.cka import linear_cka
from jaxkd.analysis.representations import collect_layers, layer_names


def knn_metrics(embed_fn: Callable, train_batches, eval_batches, num_classes: int, *,
                k: int = 20, temperature: float = 0.07) -> dict:
    """eval/knn_top1: the eval split classified by a cosine k-NN vote over the train split's
    embeddings (scripts/probe.py's protocol)."""
    train = probe.embed_batches(embed_fn, train_batches)
    test = probe.embed_batches(embed_fn, eval_batches)
    return {"eval/knn_top1": probe.knn_top1(*train, *test, k=k, temperature=temperature,
                                            num_classes=num_classes)}


def cka_metrics(layers_fn: Callable, eval_batches, num_examples: int) -> dict:
    """eval/cka_stage1..N and eval/cka_embedding: linear CKA between the teacher's and the
    student's layer of that name on the first `num_examples` eval examples.
    `layers_fn(images) -> (student layers, teacher layers)`, each its stages then its
    embedding. Stages pair up by index only when both models have as many stages; when the
    counts differ (a 3-stage CIFAR ResNet and a 4-stage VGG) only eval/cka_embedding is
    reported."""
    student, teacher = collect_layers(lambda images: tuple(layers_fn(images)), eval_batches,
                                      num_examples)
    if len(student) != len(teacher):
        return {"eval/cka_embedding": float(linear_cka(teacher[-1], student[-1]))}
    return {f"eval/cka_{name}": float(linear_cka(t, s))
            for name, s, t in zip(layer_names(len(student) - 1), student, teacher)}
