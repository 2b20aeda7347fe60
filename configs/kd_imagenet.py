r"""Hinton KD (T = 1, the official default) on ImageNet-1k.

Command (teacher,student from recipes.IMAGENET_PAIRS; default swin_t,res18):

  python -m jaxkd.main --config=configs/kd_imagenet.py:swin_t,res18 --workdir=runs/kd_in \
      --config.teacher.checkpoint=teachers/swin_t_in1k

Teachers are timm's ImageNet checkpoints converted with scripts/convert_timm.py.
Published top-1: swin_t,res18 71.14.
"""

from jaxkd import recipes


def get_config(arg="swin_t,res18"):
    return recipes.distillation_config("imagenet", arg, "kd")
