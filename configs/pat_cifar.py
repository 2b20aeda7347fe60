r"""PAT on CIFAR-100 at 224 px: RAA over the student's four stages, a feedback prompt before
each teacher stage, all loss weights 1, KD temperature 1 (REFERENCE.md section 1), with the
OFA-KD recipe for the student's family (section 3).

Command (teacher,student as in rsd_cifar.py; default swin_t,res18):

  python -m jaxkd.main --config=configs/pat_cifar.py:convnext_t,deit_t --workdir=runs/pat \
      --config.teacher.checkpoint=teachers/convnext_t_cifar100

The log reports the method's extra trainable parameters (RAA, aligners, prompt blocks; e.g.
38,521,997 for swin_t,res18 and 14,475,236 for convnext_t,deit_t, as the official code). The
teacher runs twice per step (with and without prompts), so a step costs about 3x KD's.

The prompt blocks' squeeze-and-excitation scales its input by its gate; the official code
returns the gate alone, and that produced the published numbers. A third argument `official`
reproduces it (`se_gate_only=True`):

  python -m jaxkd.main --config=configs/pat_cifar.py:swin_t,res18,official ...

Published top-1: swin_t,res18 81.22; vit_s,mbv2 78.87; convnext_t,deit_t 79.59;
convnext_t,resmlp_s12 83.50.
"""

from jaxkd import recipes


def get_config(arg="swin_t,res18"):
    pair, official = recipes.split_variant(arg, "official")
    return recipes.distillation_config("cifar", pair, "pat", temperature=1.0,
                                       se_gate_only=official)
