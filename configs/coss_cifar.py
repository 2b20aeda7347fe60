r"""CoSS (unsupervised, no labels) on CIFAR-100 at 224 px with nearest-neighbour batches.

Command (any teacher,student of the model zoo as short or timm names; default swin_t,res18):

  python -m jaxkd.main --config=configs/coss_cifar.py:swin_t,res18 --workdir=runs/coss \
      --config.teacher.checkpoint=teachers/swin_t_cifar100

The first run embeds the centre-cropped train split with the teacher and saves each image's
top-384 cosine neighbours in the workdir (reused afterwards). Batches: 16 anchors x (1 + 15
neighbours from the top 31) per device, 8 devices; SGD lr 0.03, momentum 0.9, wd 1e-4, cosine,
25 epochs (an epoch = as many images as the train split). Evaluate the student embedding with
jaxkd.analysis.probe (k-NN and linear probe); its classifier head is not trained.

Published linear-eval top-1 (CoSS paper, CIFAR-100, 32 px CIFAR models our zoo lacks):
ResNet56->ResNet20 71.11, VGG13->VGG8 74.58, ResNet32x4->ResNet8x4 73.90.
"""

from jaxkd import recipes


def get_config(arg="swin_t,res18"):
    return recipes.coss_config("cifar100", arg)
