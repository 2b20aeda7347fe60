"""Converts a checkpoint file into a jaxkd model export (a teacher for distillation).

    python scripts/convert_timm.py --model swin_tiny_patch4_window7_224 \
        --checkpoint swin_tiny_patch4_window7_224_cifar100.pth --out teachers/swin_tiny_cifar100

The checkpoint's layout is found from its keys and printed: timm's (any version; DeiT's
releases too), timm 0.6.5's / Microsoft's Swin, Facebook's ConvNeXt, Google's `.npz` ViTs and
Mixers, MoCo's query encoder (exported without a classifier: num_classes 0). A file of none of
these is one error listing the unmatched keys on both sides.

`--num-classes N --reinit-head` loads a checkpoint with another head (ImageNet weights for a
CIFAR-100 model), or none, and initialises a fresh classifier. `--overrides` builds the model
with timm keyword overrides (e.g. '{"img_size": 32}'), recorded in the export. When timm is
installed the converted model is checked against timm itself on a random batch (its logits, or
the embedding of a model without classifier) before anything is written. CRD's 32 px CIFAR
models (resnet8x4, wrn_40_2, vgg13, ...) read RepDistiller's `{'model': state_dict}` files;
timm has no twin of them to check against.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

from jaxkd import checkpoint
from jaxkd.convert import (apply_converted, convert_checkpoint, converter_for, flax_to_timm,
                           read_state_dict)
from jaxkd.convert.core import input_hw
from jaxkd.errors import JaxkdError, run_cli

# A correct conversion differs from timm by float32 rounding (~1e-5 of the logit scale); a layout
# bug by about the logits' own size. Relative to max(1, largest |logit|).
PARITY_TOLERANCE = 1e-3
PARITY_BATCH = 2


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="timm model name, e.g. resnet50")
    parser.add_argument("--checkpoint", required=True,
                        help=".safetensors, .npz, .pth, .pt, .bin or .pth.tar weights")
    parser.add_argument("--out", required=True, help="directory for the model export")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classifier size (default: the checkpoint's own)")
    parser.add_argument("--reinit-head", action="store_true",
                        help="initialise a new classifier when --num-classes differs from the "
                             "checkpoint's (or it has none)")
    parser.add_argument("--overrides", type=_json_object, default={},
                        help="model overrides as a JSON object, with timm's keyword names")
    args = parser.parse_args(argv)
    if args.reinit_head and args.num_classes is None:
        parser.error("--reinit-head needs --num-classes")
    return args


def check_timm_parity(name: str, variables: dict, num_classes: int, overrides: dict) -> None:
    """Compares the converted model with timm's on a random batch (the logits, or the embedding
    of a headless model) and refuses a disagreement; says so when timm cannot check."""
    try:
        from jaxkd.convert.timm_import import import_timm
        timm = import_timm()
        import torch
    except ImportError:
        print("timm is not installed: parity check skipped")
        return
    if not timm.is_model(name) or not converter_for(name).timm_twin:
        print(f"timm does not define {name} with this layout: parity check skipped")
        return
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **overrides)
    state_dict = flax_to_timm(name, variables)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    images = np.random.default_rng(0).normal(
        size=(PARITY_BATCH, *input_hw(name, overrides), 3)).astype(np.float32)
    with torch.no_grad():  # timm's num_classes=0 model returns the pre-logits embedding
        expected = model.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    logits, features = apply_converted(name, variables, images, **overrides)
    what, ours = ("embedding", features["embedding"]) if logits is None else ("logit", logits)
    diff = float(np.max(np.abs(np.asarray(ours) - expected)))
    scale = float(np.max(np.abs(expected)))
    print(f"parity with timm: max abs {what} difference {diff:.2e} (largest |{what}| "
          f"{scale:.2f})")
    if diff > PARITY_TOLERANCE * max(1.0, scale):
        raise JaxkdError(f"converted {name} disagrees with timm (max abs {what} difference "
                         f"{diff:.2e}); nothing written")


def convert(args) -> None:
    state_dict = read_state_dict(args.checkpoint)
    conversion = convert_checkpoint(args.model, state_dict, num_classes=args.num_classes,
                                    reinit_head=args.reinit_head, **args.overrides)
    print(f"checkpoint layout: {conversion.layout.name}")
    for reason, keys in conversion.left_out.items():
        print(f"left out, {reason}: {len(keys)} tensors ({', '.join(keys[:3])}"
              f"{', ...' if len(keys) > 3 else ''})")
    variables, num_classes = conversion.variables, conversion.num_classes
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))
    classes = (f"{num_classes} classes" if num_classes else
               "no classifier (num_classes 0): a backbone for embedding-only methods")
    print(f"{args.model}: {count:,} parameters, {classes}")
    check_timm_parity(args.model, variables, num_classes, args.overrides)
    checkpoint.save_model(
        args.out, variables, model_name=args.model, num_classes=num_classes,
        overrides=args.overrides,
        extra={"converted_from": args.checkpoint, "reinit_head": bool(args.reinit_head),
               "layout": conversion.layout.name,
               "left_out": {reason: len(keys) for reason, keys in conversion.left_out.items()}})
    print(f"wrote {args.out}")


def main(argv=None) -> int:
    args = parse_args(argv)
    # Parity must be float32-exact on accelerators too, where matmuls default to bf16 passes.
    jax.config.update("jax_default_matmul_precision", "highest")
    return run_cli(lambda: convert(args))


if __name__ == "__main__":
    sys.exit(main())
