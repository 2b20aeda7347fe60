r"""DKD on CIFAR-100 at 224 px, with the OFA code's settings (alpha 1, beta 2, T 1, no warmup).

Command (teacher,student as in rsd_cifar.py; default swin_t,res18):

  python -m jaxkd.main --config=configs/dkd_cifar.py:swin_t,res18 --workdir=runs/dkd_swin_res18 \
      --config.teacher.checkpoint=teachers/swin_t_cifar100

mdistiller's CIFAR setting instead: --config.method.beta=8 --config.method.temperature=4
--config.method.warmup_steps=<20 epochs of steps: 20 * (50000 // batch_size)>.
Published top-1: swin_t,res18 80.26.
"""

from jaxkd import recipes


def get_config(arg="swin_t,res18"):
    return recipes.distillation_config("cifar", arg, "dkd", alpha=1.0, beta=2.0, temperature=1.0)
