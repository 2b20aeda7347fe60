r"""OFA-KD on ImageNet-1k: branches on all four stages, gamma (ofa_eps) 1.5.

Command (teacher,student from recipes.IMAGENET_PAIRS or recipes.OFA_MLP_PAIRS; default
swin_t,res18):

  python -m jaxkd.main --config=configs/ofa_imagenet.py:swin_t,res18 --workdir=runs/ofa_in \
      --config.teacher.checkpoint=teachers/swin_t_in1k

gamma 1.5 is the official README's command (DeiT-T -> ResNet18), used for every pair here.
Published top-1: swin_t,res18 71.85.

The supplement's MLP students (section A, Figure 5), taught by a ViT-B of 86.53% top-1:
vit_b,mixer_b16  vit_b,vip_s7  vit_b,cyclemlp_b3  vit_b,hiremlp_s, each against its
from-scratch run (configs/ce_imagenet.py:<student>). The text gives OFA-KD's gain over scratch
as 1.2 to 2.6 points and cyclemlp_b3 at 84.08; Figure 5's other values are only drawn.
ViP-S/7 gets token branches; CycleMLP-B3 and HireMLP-S, whose stages are (H, W, C) maps, get
the CNN branches, as the official code decides from their stage shapes.
"""

from jaxkd import recipes


def get_config(arg="swin_t,res18"):
    return recipes.distillation_config("imagenet", arg, "ofa",
                                       pairs=recipes.IMAGENET_PAIRS + recipes.OFA_MLP_PAIRS,
                                       eps=1.5)
