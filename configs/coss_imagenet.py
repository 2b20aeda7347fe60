r"""CoSS (unsupervised, no labels) on ImageNet with nearest-neighbour batches.

Command (default res50,res18, the paper's MoCo-v2 ResNet50 -> ResNet18 pair):

  python -m jaxkd.main --config=configs/coss_imagenet.py:res50,res18 --workdir=runs/coss_in \
      --config.teacher.checkpoint=teachers/res50_mocov2

Recipe as configs/coss_cifar.py: top-384 teacher index, 16 anchors x 16 images per device on
8 devices, SGD lr 0.03, momentum 0.9, wd 1e-4, cosine, 25 epochs. The neighbour sampler holds
the encoded train split in memory (jaxkd.data.neighbours.MAX_IN_MEMORY_BYTES) and refuses
full ImageNet (~140 GB): use `--config.dataset.train_fraction` for a subset that fits.

Published linear-eval top-1 (CoSS paper): ResNet50 (MoCo-v2) -> ResNet18 62.35.
"""

from jaxkd import recipes


def get_config(arg="res50,res18"):
    return recipes.coss_config("imagenet2012", arg)
