"""Converts a timm checkpoint file into a jaxkd model export (a teacher for distillation).

    python scripts/convert_timm.py --model swin_tiny_patch4_window7_224 \
        --checkpoint swin_tiny_cifar100.pth --out teachers/swin_tiny_cifar100

`--num-classes N --reinit-head` loads a checkpoint with another head (ImageNet weights for a
CIFAR-100 model) and initialises a fresh classifier. When timm is installed the converted model
is checked against timm itself on a random batch before anything is written. CRD's 32 px CIFAR
models (resnet8x4, wrn_40_2, vgg13, ...) read RepDistiller's `{'model': state_dict}` files;
timm has no twin of them to check against.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from jaxkd import checkpoint
from jaxkd.convert import flax_to_timm, read_state_dict, timm_to_flax
from jaxkd.convert.core import has_timm_twin
from jaxkd.errors import JaxkdError, run_cli
from jaxkd.models import create_model, model_info

# A correct conversion differs from timm by float32 rounding (~1e-5 of the logit scale); a layout
# bug by about the logits' own size. Relative to max(1, largest |logit|).
PARITY_TOLERANCE = 1e-3
PARITY_BATCH = 2


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="timm model name, e.g. resnet50")
    parser.add_argument("--checkpoint", required=True,
                        help=".safetensors, .pth, .pt, .bin or .pth.tar state dict")
    parser.add_argument("--out", required=True, help="directory for the model export")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classifier size (default: the checkpoint's own)")
    parser.add_argument("--reinit-head", action="store_true",
                        help="initialise a new classifier when --num-classes differs from the "
                             "checkpoint's")
    args = parser.parse_args(argv)
    if args.reinit_head and args.num_classes is None:
        parser.error("--reinit-head needs --num-classes")
    return args


def timm_parity(name: str, variables: dict, num_classes: int) -> tuple[float, float] | None:
    """(max abs logit difference, largest |logit|) of timm vs Flax on a random batch.

    None when timm is not installed.
    """
    try:
        from jaxkd.convert.timm_import import import_timm
        timm = import_timm()
        import torch
    except ImportError:
        return None
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    state_dict = flax_to_timm(name, variables)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    size = model_info(name).input_size
    images = np.random.default_rng(0).normal(size=(PARITY_BATCH, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    logits, _ = jax.jit(create_model(name, num_classes=num_classes).apply)(variables, images)
    return float(np.max(np.abs(np.asarray(logits) - expected))), float(np.max(np.abs(expected)))


def convert(args) -> None:
    state_dict = read_state_dict(args.checkpoint)
    variables = timm_to_flax(args.model, state_dict, num_classes=args.num_classes,
                             reinit_head=args.reinit_head)
    num_classes = int(variables["params"]["head"]["kernel"].shape[-1])
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))
    print(f"{args.model}: {count:,} parameters, {num_classes} classes")
    if not has_timm_twin(args.model):
        print(f"timm has no {args.model} of this layout: parity check skipped")
    elif (parity := timm_parity(args.model, variables, num_classes)) is None:
        print("timm is not installed: parity check skipped")
    else:
        diff, scale = parity
        print(f"parity with timm: max abs logit difference {diff:.2e} (largest logit {scale:.2f})")
        if diff > PARITY_TOLERANCE * max(1.0, scale):
            raise JaxkdError(f"converted {args.model} disagrees with timm (max abs logit "
                             f"difference {diff:.2e}); nothing written")
    checkpoint.save_model(args.out, variables, model_name=args.model, num_classes=num_classes,
                          overrides={}, extra={"converted_from": args.checkpoint,
                                               "reinit_head": bool(args.reinit_head)})
    print(f"wrote {args.out}")


def main(argv=None) -> int:
    args = parse_args(argv)
    # Parity must be float32-exact on accelerators too, where matmuls default to bf16 passes.
    jax.config.update("jax_default_matmul_precision", "highest")
    return run_cli(lambda: convert(args))


if __name__ == "__main__":
    sys.exit(main())
