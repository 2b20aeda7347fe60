r"""OFA-KD on CIFAR-100 at 224 px: branches on all four stages, gamma (ofa_eps) 1.0.

Command (teacher,student as in rsd_cifar.py; default swin_t,res18):

  python -m jaxkd.main --config=configs/ofa_cifar.py:swin_t,res18 --workdir=runs/ofa \
      --config.teacher.checkpoint=teachers/swin_t_cifar100

MobileNetV2 students use a branch weight (ofa_weight) of 0.1, the others 1.
Published top-1: swin_t,res18 80.54; vit_s,mbv2 78.45; convnext_t,deit_t 75.76;
convnext_t,resmlp_s12 81.22.
"""

from jaxkd import recipes


def get_config(arg="swin_t,res18"):
    student = recipes.parse_pair(arg, recipes.CIFAR_PAIRS)[1]
    ofa_weight = 0.1 if student == recipes.resolve_model("mbv2") else 1.0
    return recipes.distillation_config("cifar", arg, "ofa", eps=1.0, ofa_weight=ofa_weight)
