r"""From-scratch baseline on ImageNet-1k (cross-entropy with label smoothing, no teacher).

Command (a student alias, or a teacher,student pair of the ImageNet configs whose teacher is
ignored; default res18):

  python -m jaxkd.main --config=configs/ce_imagenet.py:res18 --workdir=runs/ce_in_res18

Students: res18 mbv2 deit_t swin_n resmlp_s12, and the OFA-KD supplement's MLP students
mixer_b16 vip_s7 cyclemlp_b3 hiremlp_s (recipes.OFA_MLP_PAIRS). Recipe: recipes.imagenet_recipe.

Published top-1: res18 69.75 (the Swin-T -> ResNet18 table of the OFA-KD/RSD papers).
ImageNet must be prepared with TFDS (imagenet2012, see README).
"""

from jaxkd import recipes


def get_config(arg="res18"):
    return recipes.scratch_config("imagenet", arg,
                                  pairs=recipes.IMAGENET_PAIRS + recipes.OFA_MLP_PAIRS)
