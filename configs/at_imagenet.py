r"""Attention transfer on ImageNet-1k: PAT's homogeneous ResNet34 -> ResNet18 setting (PAT
supplement Table 1), with the OFA-KD recipe for CNN students that PAT follows.

Command (the only pair: res34,res18):

  python -m jaxkd.main --config=configs/at_imagenet.py:res34,res18 --workdir=runs/at_in1k \
      --config.teacher.checkpoint=teachers/resnet34_in1k

AT on all four stages (p = 2, weight 1000 per stage, RepDistiller's) with CE (label smoothing
0.1); 100 epochs, 8 x 64, SGD lr 0.1 x0.1 at 30/60/90 after 3 warmup epochs, wd 1e-4.

Published top-1 (PAT supplement Table 1, mean of 3 runs): AT 69.56; teacher ResNet34 73.31,
student from scratch 69.75, KD 70.66, OFA 72.10, CRD 71.17, PAT 71.18.
"""

from jaxkd import recipes

PAIRS = (("res34", "res18"),)


def get_config(arg="res34,res18"):
    return recipes.distillation_config("imagenet", arg, "at", pairs=PAIRS)
