"""Exports a jaxkd model export (a trained student or a converted teacher) as timm weights.

    python scripts/export_timm.py --checkpoint runs/rsd_r18/export --out resnet18_rsd.safetensors

The file loads with `timm.create_model(name, num_classes=N).load_state_dict(..., strict=True)`;
when timm is installed that load is verified before the file is written. CRD's CIFAR models are
written in RepDistiller's layout (its models load the file's tensors with strict=True), which
timm cannot verify.
"""

from __future__ import annotations

import argparse
import sys

from jaxkd import checkpoint
from jaxkd.convert import flax_to_timm
from jaxkd.convert import converter_for
from jaxkd.errors import JaxkdError, run_cli


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="model export directory")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    return parser.parse_args(argv)


def verify_with_timm(state_dict: dict, meta: dict) -> bool:
    """Loads the state dict into the timm model strictly; False when timm is not installed."""
    try:
        from jaxkd.convert.timm_import import import_timm
        timm = import_timm()
        import torch
    except ImportError:
        return False
    model = timm.create_model(meta["model_name"], pretrained=False,
                              num_classes=meta["num_classes"], **meta.get("overrides", {}))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    return True


def export(args) -> None:
    from safetensors.numpy import save_file

    if not args.out.endswith(".safetensors"):
        raise JaxkdError(f"--out must be a .safetensors file, got {args.out!r}")
    variables, meta = checkpoint.load_model(args.checkpoint)
    state_dict = flax_to_timm(meta["model_name"], variables)
    if not converter_for(meta["model_name"]).timm_twin:
        print(f"timm has no {meta['model_name']} of this layout: strict-load check skipped")
    elif verify_with_timm(state_dict, meta):
        print(f"verified: timm {meta['model_name']} loads it with strict=True")
    else:
        print("timm is not installed: strict-load check skipped")
    save_file(state_dict, args.out, metadata={"model_name": meta["model_name"],
                                              "num_classes": str(meta["num_classes"])})
    print(f"wrote {args.out} ({len(state_dict)} tensors)")


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: export(args))


if __name__ == "__main__":
    sys.exit(main())
