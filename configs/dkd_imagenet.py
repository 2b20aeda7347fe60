r"""DKD on ImageNet-1k, with the OFA code's settings (alpha 1, beta 2, T 1, no warmup).

Command (teacher,student from recipes.IMAGENET_PAIRS; default swin_t,res18):

  python -m jaxkd.main --config=configs/dkd_imagenet.py:swin_t,res18 --workdir=runs/dkd_in \
      --config.teacher.checkpoint=teachers/swin_t_in1k

No published number in REFERENCE.md section 3 for these pairs; compare with kd_imagenet.py
(swin_t,res18 71.14) and ofa_imagenet.py (71.85).
"""

from jaxkd import recipes


def get_config(arg="swin_t,res18"):
    return recipes.distillation_config("imagenet", arg, "dkd", alpha=1.0, beta=2.0,
                                       temperature=1.0)
