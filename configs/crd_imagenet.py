r"""CRD (128-d, 16384 negatives, T 0.07, momentum 0.5, weight 0.8) on ImageNet-1k.

Command (teacher,student from recipes.IMAGENET_PAIRS; default swin_t,res18):

  python -m jaxkd.main --config=configs/crd_imagenet.py:swin_t,res18 --workdir=runs/crd_in \
      --config.teacher.checkpoint=teachers/swin_t_in1k

The memory banks hold 2 x 1281167 x 128 floats (1.3 GB, replicated on every device and in
every checkpoint). No published number in REFERENCE.md section 3; compare with
kd_imagenet.py (swin_t,res18 71.14).
"""

from jaxkd import recipes


def get_config(arg="swin_t,res18"):
    return recipes.distillation_config("imagenet", arg, "crd")
