r"""OFA-KD on ImageNet-1k: branches on all four stages, gamma (ofa_eps) 1.5.

Command (teacher,student from recipes.IMAGENET_PAIRS; default swin_t,res18):

  python -m jaxkd.main --config=configs/ofa_imagenet.py:swin_t,res18 --workdir=runs/ofa_in \
      --config.teacher.checkpoint=teachers/swin_t_in1k

gamma 1.5 is the official README's command (DeiT-T -> ResNet18), used for every pair here.
Published top-1: swin_t,res18 71.85.
"""

from jaxkd import recipes


def get_config(arg="swin_t,res18"):
    return recipes.distillation_config("imagenet", arg, "ofa", eps=1.5)
