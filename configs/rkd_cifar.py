r"""RKD (distance 25 + angle 50, smooth L1, on the pre-logits embeddings) on CIFAR-100 at
224 px with the OFA-KD recipe (the OFA-KD code's distillers/rkd.py; batch statistics per
device).

Command (teacher,student as in rsd_cifar.py; default swin_t,res18):

  python -m jaxkd.main --config=configs/rkd_cifar.py:swin_t,res18 --workdir=runs/rkd \
      --config.teacher.checkpoint=teachers/swin_t_cifar100

Published top-1: the OFA-KD paper's RKD row (its CIFAR-100 table) is not recorded in
REFERENCE.md; compare with KD (kd_cifar.py): swin_t,res18 78.74; vit_s,mbv2 72.77;
convnext_t,deit_t 72.99; convnext_t,resmlp_s12 72.25.
"""

from jaxkd import recipes


def get_config(arg="swin_t,res18"):
    return recipes.distillation_config("cifar", arg, "rkd")
