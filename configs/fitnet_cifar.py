r"""FitNet on all four stages (weight 0.1), any architecture pair, on CIFAR-100 at 224 px.

Command (teacher,student as in rsd_cifar.py; default swin_t,res18):

  python -m jaxkd.main --config=configs/fitnet_cifar.py:swin_t,res18 --workdir=runs/fitnet \
      --config.teacher.checkpoint=teachers/swin_t_cifar100

Stage features are aligned by patch embedding / token merging / unpatchify (jaxkd.distill.fitnet).
Published top-1: swin_t,res18 78.87.
"""

from jaxkd import recipes


def get_config(arg="swin_t,res18"):
    return recipes.distillation_config("cifar", arg, "fitnet", fitnet_weight=0.1)
