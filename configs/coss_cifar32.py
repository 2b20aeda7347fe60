r"""CoSS on CIFAR-100 at 32 px with CRD's models and recipe: the CoSS supplement's Tables 1-4.

Command (teacher,student[,variant]; default resnet32x4,resnet8x4):

  python -m jaxkd.main --config=configs/coss_cifar32.py:resnet32x4,resnet8x4,ss \
      --workdir=runs/coss_ss_r32x4_r8x4 --config.teacher.checkpoint=teachers/resnet32x4
  python scripts/probe.py --model runs/coss_ss_r32x4_r8x4/export --dataset cifar100 \
      --image-size 32

Pairs: resnet56,resnet20 vgg13,vgg8 resnet32x4,resnet8x4 wrn_40_2,wrn_16_2. Variants:
  (none)       L_co + 0.5 L_ss, the published setting (Table 1, L_cross of Table 2, Table 3's
               lambda = 0.5, Table 4's CoSS (k = 0))
  co           L_co alone (Table 2; Table 3's lambda = 0)
  ss           L_ss alone (Table 2)
  lambda0.25   L_co + 0.25 L_ss (Table 3)
  lambda1      L_co + L_ss (Table 3)
  bn           the BatchNorm variant of section 4 (method coss_bn: BN to the teacher's
               unnormalised space, MSE; Table 4)
Batches are random (k = 0, no nearest-neighbour sampling: dataset.sampler "random"), the space
similarity over the whole batch (stats_groups=1, one GPU as the original). Unsupervised:
evaluated by k-NN during training and by the linear probe after. The temperatures (jaxkd's
0.1 and 0.07) only scale the loss here, as a loss weight would.

Recipe: CRD's (recipes.cifar32_recipe: 240 epochs, SGD lr 0.05, x0.1 at 150/180/210, wd 5e-4)
with URepDistiller's batch of 128. The published numbers come from URepDistiller's linear
evaluation (100 epochs of SGD on the frozen student, lr 0.1 decayed at 50/70/90, random
crops); scripts/probe.py fits its probe on fixed centre-crop embeddings.

Published linear-eval top-1 (CoSS supplement):

  variant      resnet56,resnet20  vgg13,vgg8  resnet32x4,resnet8x4  wrn_40_2,wrn_16_2
  (none)       71.11              74.58       73.90                 74.65
  co           70.58                          72.05
  ss           70.42                          73.53
  lambda0.25   71.34                          73.44
  lambda1      70.68                          73.91
  bn                              74.01       72.22                 73.42
"""

from jaxkd import recipes
from jaxkd.errors import ConfigError

# variant -> (method, its fields)
VARIANTS = {
    "": ("coss", {"lambda_ss": 0.5}),
    "co": ("coss", {"lambda_ss": 0.0}),
    "ss": ("coss", {"lambda_ss": 1.0, "co_weight": 0.0}),
    "lambda0.25": ("coss", {"lambda_ss": 0.25}),
    "lambda1": ("coss", {"lambda_ss": 1.0}),
    "bn": ("coss_bn", {}),
}


def get_config(arg="resnet32x4,resnet8x4"):
    parts = [p.strip() for p in (arg or "").split(",")]
    variant = parts[2] if len(parts) == 3 else ""
    if variant not in VARIANTS:
        raise ConfigError(f"config argument {arg!r}: the variant must be one of "
                          f"{' '.join(v for v in VARIANTS if v)} (or none)")
    method, fields = VARIANTS[variant]
    if method == "coss":
        fields = {**fields, "stats_groups": 1}
    config = recipes.cifar32_config(",".join(parts[:2]), recipes.COSS_CIFAR_PAIRS, method,
                                    batch_size=recipes.UNSUPERVISED_CIFAR32_BATCH, **fields)
    config.dataset.sampler = "random"
    return config
