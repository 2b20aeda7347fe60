r"""RSD on ImageNet-1k: lambda 0.01, kappa 0.01, AAD expansion 4, per-device batch statistics.

Command (teacher,student from recipes.IMAGENET_PAIRS; default swin_t,res18):

  python -m jaxkd.main --config=configs/rsd_imagenet.py:swin_t,res18 --workdir=runs/rsd_in \
      --config.teacher.checkpoint=teachers/swin_t_in1k

Published top-1: swin_t,res18 72.13 (8 GPUs; the statistics are per device, so run on 8
devices to match).
"""

from jaxkd import recipes


def get_config(arg="swin_t,res18"):
    return recipes.distillation_config("imagenet", arg, "rsd", rsd_weight=0.01, kappa=0.01,
                                       expansion=4.0)
