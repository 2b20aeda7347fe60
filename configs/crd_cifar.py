r"""CRD (128-d, 16384 negatives, T 0.07, momentum 0.5, weight 0.8) on CIFAR-100 at 224 px.

Command (teacher,student as in rsd_cifar.py; default swin_t,res18):

  python -m jaxkd.main --config=configs/crd_cifar.py:swin_t,res18 --workdir=runs/crd \
      --config.teacher.checkpoint=teachers/swin_t_cifar100

The memory banks hold 2 x 50000 x 128 floats. No published number in REFERENCE.md section 3;
compare with kd_cifar.py (swin_t,res18 78.74).
"""

from jaxkd import recipes


def get_config(arg="swin_t,res18"):
    return recipes.distillation_config("cifar", arg, "crd")
