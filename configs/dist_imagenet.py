r"""DIST (beta = gamma = tau = 1) on ImageNet-1k.

Command (teacher,student from recipes.IMAGENET_PAIRS; default swin_t,res18):

  python -m jaxkd.main --config=configs/dist_imagenet.py:swin_t,res18 --workdir=runs/dist_in \
      --config.teacher.checkpoint=teachers/swin_t_in1k

No published number in REFERENCE.md section 3; compare with kd_imagenet.py (swin_t,res18
71.14).
"""

from jaxkd import recipes


def get_config(arg="swin_t,res18"):
    return recipes.distillation_config("imagenet", arg, "dist")
