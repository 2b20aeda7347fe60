r"""FitNet on all four stages (weight 0.1), any architecture pair, on ImageNet-1k.

Command (teacher,student from recipes.IMAGENET_PAIRS; default swin_t,res18):

  python -m jaxkd.main --config=configs/fitnet_imagenet.py:swin_t,res18 --workdir=runs/fit_in \
      --config.teacher.checkpoint=teachers/swin_t_in1k

No published number in REFERENCE.md section 3; compare with kd_imagenet.py (swin_t,res18
71.14).
"""

from jaxkd import recipes


def get_config(arg="swin_t,res18"):
    return recipes.distillation_config("imagenet", arg, "fitnet", fitnet_weight=0.1)
