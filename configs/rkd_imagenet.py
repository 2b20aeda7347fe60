r"""RKD (distance 25 + angle 50, smooth L1, on the pre-logits embeddings) on ImageNet-1k with
the OFA-KD recipe of the student's family (the OFA-KD code's distillers/rkd.py).

Command (teacher,student as in rsd_imagenet.py; default swin_t,res18):

  python -m jaxkd.main --config=configs/rkd_imagenet.py:swin_t,res18 --workdir=runs/rkd_in1k \
      --config.teacher.checkpoint=teachers/swin_t_in1k

Published top-1: the OFA-KD paper's RKD row (its ImageNet table) is not recorded in
REFERENCE.md; compare with swin_t,res18: scratch 69.75, KD 71.14, OFA 71.85.
"""

from jaxkd import recipes


def get_config(arg="swin_t,res18"):
    return recipes.distillation_config("imagenet", arg, "rkd")
