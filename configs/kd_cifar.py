r"""Hinton KD (T = 1, the official default) on CIFAR-100 at 224 px.

Command (teacher,student as in rsd_cifar.py; default swin_t,res18):

  python -m jaxkd.main --config=configs/kd_cifar.py:swin_t,res18 --workdir=runs/kd_swin_res18 \
      --config.teacher.checkpoint=teachers/swin_t_cifar100

Published top-1: swin_t,res18 78.74; vit_s,mbv2 72.77; convnext_t,deit_t 72.99;
convnext_t,resmlp_s12 72.25.
"""

from jaxkd import recipes


def get_config(arg="swin_t,res18"):
    return recipes.distillation_config("cifar", arg, "kd")
