r"""DIST (beta = gamma = tau = 1) on CIFAR-100 at 224 px.

Command (teacher,student as in rsd_cifar.py; default swin_t,res18):

  python -m jaxkd.main --config=configs/dist_cifar.py:swin_t,res18 --workdir=runs/dist \
      --config.teacher.checkpoint=teachers/swin_t_cifar100

No published number in REFERENCE.md section 3; compare with kd_cifar.py (swin_t,res18 78.74).
"""

from jaxkd import recipes


def get_config(arg="swin_t,res18"):
    return recipes.distillation_config("cifar", arg, "dist")
