r"""From-scratch baseline on CIFAR-100 at 224 px (cross-entropy with label smoothing, no teacher).

Command (a student alias, or a teacher,student pair of rsd_cifar.py whose teacher is ignored so
that the baselines of a table share one argument list; default res18):

  python -m jaxkd.main --config=configs/ce_cifar.py:res18 --workdir=runs/ce_res18

Students: res18 mbv2 deit_t swin_p resmlp_s12. Recipe: REFERENCE.md section 3 (SGD for CNNs,
AdamW for ViT/MLP students).

Published top-1 (OFA-KD paper tables, 224 px): res18 74.01, mbv2 73.68, deit_t 68.00,
resmlp_s12 66.56. The 74.01 came from an older recipe; the current one gives about 77.
"""

from jaxkd import recipes


def get_config(arg="res18"):
    return recipes.scratch_config("cifar", arg)
