r"""RSD on CIFAR-100 at 224 px with the paper's recipe (OFA-KD's, REFERENCE.md section 3).

Command (teacher,student as short names; default swin_t,res18):

  python -m jaxkd.main --config=configs/rsd_cifar.py:swin_t,res18 --workdir=runs/rsd_swin_res18 \
      --config.teacher.checkpoint=teachers/swin_t_cifar100

Pairs: swin_t,res18 vit_s,res18 mixer_b16,res18 swin_t,mbv2 vit_s,mbv2 mixer_b16,mbv2
convnext_t,deit_t mixer_b16,deit_t convnext_t,swin_p mixer_b16,swin_p convnext_t,resmlp_s12
swin_t,resmlp_s12.

Expected top-1 (paper, 8 GPUs x 128, 300 epochs): swin_t,res18 83.92; vit_s,mbv2 81.68;
convnext_t,deit_t 82.46; convnext_t,resmlp_s12 84.21; mixer_b16,deit_t 78.50.
The teacher checkpoint is a converted CIFAR-100 fine-tuned timm state dict
(scripts/convert_timm.py); CIFAR-100 must be prepared with TFDS (see README).
"""

from jaxkd import recipes


def get_config(arg="swin_t,res18"):
    # RSD: lambda 0.1, kappa 0.01, AAD expansion 2, batch statistics per device.
    return recipes.distillation_config("cifar", arg, "rsd", rsd_weight=0.1, kappa=0.01,
                                       expansion=2.0)
