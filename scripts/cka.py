"""Linear CKA between every stage of a teacher and every stage of a student, as a heatmap.

    python scripts/cka.py --teacher teachers/swin_t_cifar100 --student runs/rsd/export \
        --dataset cifar100 --image-size 224 --num-examples 512 --out runs/rsd/cka

Both models (jaxkd model exports) see the same held-out images, each normalised with its own
mean/std; features are flattened per example. A model's layers are its stages (3 or 4) and its
embedding. Writes cka.json ({"teacher_layers", "student_layers", "cka": [[...]] with teacher
layers as rows}) and cka.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jaxkd.analysis.representations import cka_matrix, collect_features, layer_names, load_export
from jaxkd.errors import JaxkdError


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="teacher model export directory")
    parser.add_argument("--student", required=True, help="student model export directory")
    parser.add_argument("--dataset", required=True, help="sklearn_digits, cifar100, ...")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-examples", type=int, default=512,
                        help="held-out examples used (the first ones of the eval split)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", required=True, help="output directory")
    return parser.parse_args(argv)


def plot_heatmap(matrix, teacher_layers, student_layers, teacher_label: str,
                 student_label: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="magma", origin="lower")
    ax.set_xticks(range(len(student_layers)), student_layers, rotation=30)
    ax.set_yticks(range(len(teacher_layers)), teacher_layers)
    ax.set_xlabel(f"student: {student_label}")
    ax.set_ylabel(f"teacher: {teacher_label}")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center",
                    color="black" if matrix[i, j] > 0.6 else "white", fontsize=9)
    fig.colorbar(image, ax=ax, label="linear CKA")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        teacher, student = load_export(args.teacher), load_export(args.student)
        features = collect_features([teacher, student], args.dataset,
                                    image_size=args.image_size, num_examples=args.num_examples,
                                    batch_size=args.batch_size, data_dir=args.data_dir)
    except JaxkdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    matrix = cka_matrix(*features)
    teacher_layers, student_layers = (list(layer_names(len(f) - 1)) for f in features)
    os.makedirs(args.out, exist_ok=True)
    result = {"teacher": teacher.name, "student": student.name, "dataset": args.dataset,
              "num_examples": len(features[0][0]), "teacher_layers": teacher_layers,
              "student_layers": student_layers, "cka": matrix.tolist()}
    with open(os.path.join(args.out, "cka.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot_heatmap(matrix, teacher_layers, student_layers, teacher.name, student.name,
                 os.path.join(args.out, "cka.png"))
    print(f"linear CKA on {result['num_examples']} examples written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
