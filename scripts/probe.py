"""k-NN and linear-probe top-1 of a model export's embedding (for unsupervised students).

    python scripts/probe.py --model runs/coss/export --dataset cifar100 --image-size 224 \
        --out runs/coss/probe.json

Both probes fit on the centre-cropped train split's embeddings and are scored on the eval
split (jaxkd.analysis.probe): k-NN with cosine similarity (weighted vote), and a linear
classifier trained with AdamW on the frozen, standardised embeddings.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from jaxkd import build, data
from jaxkd.analysis import probe
from jaxkd.analysis.representations import load_export
from jaxkd.errors import JaxkdError


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model export directory")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data-dir", default=None, help="TFDS data dir")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--knn-k", type=int, default=20)
    parser.add_argument("--knn-temperature", type=float, default=0.07)
    parser.add_argument("--linear-epochs", type=int, default=30)
    parser.add_argument("--linear-lr", type=float, default=1e-3)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    return parser.parse_args(argv)


def embedding_fn(model):
    forward = jax.jit(lambda v, x: model.module.apply(v, (x - model.mean) / model.std,
                                                      train=False)[1]["embedding"])
    return lambda images: forward(model.variables, images)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model = load_export(args.model)
        dataset = data.open_dataset(args.dataset, args.data_dir)
        info = dataset.info
        embed = embedding_fn(model)
        view = build.eval_view(model.name)  # as the model is evaluated in training
        train = probe.embed_batches(embed, dataset.centre_crop_train_batches(
            image_size=args.image_size, batch_size=args.batch_size, view=view))
        test = probe.embed_batches(embed, dataset.eval_batches(
            global_batch_size=args.batch_size, image_size=args.image_size, view=view))
    except JaxkdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result = {
        "model": model.name, "dataset": args.dataset,
        "knn_top1": probe.knn_top1(*train, *test, k=args.knn_k,
                                   temperature=args.knn_temperature,
                                   num_classes=info.num_classes),
        "linear_top1": probe.linear_probe_top1(*train, *test, num_classes=info.num_classes,
                                               epochs=args.linear_epochs, lr=args.linear_lr)}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
