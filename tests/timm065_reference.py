"""Writes Swin checkpoints and outputs with timm 0.6.5, the code the official teachers come from.

Run by tests/test_convert_layouts.py in a subprocess whose PYTHONPATH puts the side install of
timm 0.6.5 (made by `make venv`) first: two timm versions cannot share a process.

    python tests/timm065_reference.py OUT_DIR

writes to OUT_DIR, for each model of SMALL (keyed by its jaxkd name), `<name>.pth` (a
perturbed state dict wrapped under 'model', as the official teachers are saved) and
`<name>.npz` (its logits and embedding on `images.npy`); `full_swin_tiny.pth`, the full-size
Swin-T with a CIFAR-100 head; `eval_views.json`, the eval crop_pct and interpolation of every
jaxkd model timm 0.6.5 has; and last `version.txt`, the version of timm that wrote them.
"""

import json
import os
import sys

import numpy as np
import torch

from jaxkd.convert.timm_import import import_timm
from timm_parity import perturbed

BATCH, IMAGE_SIZE, NUM_CLASSES = 2, 32, 10
# Reduced Swin-T and Swin-N (the OFA-KD paper's embed/depths/heads pattern at width 16) on 32px
# images: an 8x8 map under a 4x4 window has shifted windows and a stored attn_mask; the
# original code needs every map to tile into windows and to halve evenly.
SMALL = {
    "swin_tiny_patch4_window7_224": dict(img_size=IMAGE_SIZE, window_size=4, embed_dim=16,
                                         depths=(2, 1, 1, 1), num_heads=(1, 2, 2, 4)),
    "swin_nano_patch4_window7_224": dict(img_size=IMAGE_SIZE, window_size=4, embed_dim=16,
                                         depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16)),
}


def main(out_dir: str) -> None:
    timm = import_timm()
    swin = timm.models.swin_transformer.SwinTransformer
    images = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE,
                         generator=torch.Generator().manual_seed(1))
    np.save(os.path.join(out_dir, "images.npy"), images.permute(0, 2, 3, 1).numpy())
    for seed, (name, kw) in enumerate(SMALL.items()):
        model = perturbed(swin(num_classes=NUM_CLASSES, **kw), seed=seed)
        with torch.no_grad():
            embedding = model.forward_head(model.forward_features(images), pre_logits=True)
            logits = model.head(embedding)
        torch.save({"model": model.state_dict()}, os.path.join(out_dir, f"{name}.pth"))
        np.savez(os.path.join(out_dir, f"{name}.npz"), logits=logits.numpy(),
                 embedding=embedding.numpy())
    full = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=100)
    torch.save(full.state_dict(), os.path.join(out_dir, "full_swin_tiny.pth"))
    from jaxkd.models import list_models

    views = {name: {key: timm.models.get_pretrained_cfg(name)[key]
                    for key in ("crop_pct", "interpolation")}
             for name in list_models() if timm.models.is_model(name)}
    with open(os.path.join(out_dir, "eval_views.json"), "w") as f:
        json.dump(views, f)
    with open(os.path.join(out_dir, "version.txt"), "w") as f:  # last: marks the set complete
        f.write(timm.__version__)


if __name__ == "__main__":
    main(sys.argv[1])
