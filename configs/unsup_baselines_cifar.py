r"""Supervised baselines adapted to unsupervised distillation on CIFAR-100 at 32 px: the CoSS
supplement's section 1 and Table 1.

Command (method,teacher,student; default vid,resnet32x4,resnet8x4):

  python -m jaxkd.main --config=configs/unsup_baselines_cifar.py:vid,resnet32x4,resnet8x4 \
      --workdir=runs/vid_unsup_r32x4_r8x4 --config.teacher.checkpoint=teachers/resnet32x4 \
      --config.method.loss_scale=4
  python scripts/probe.py --model runs/vid_unsup_r32x4_r8x4/export --dataset cifar100 \
      --image-size 32

Methods: at sp vid rkd pkt ft nst crd srrl, each as its `<method>_unsup` variant
(jaxkd.distill.feature): no label read, no CE, no logit term (SRRL keeps its feature term, CRD
draws its negatives uniformly), the student's classifier untrained, evaluated by k-NN during
training and by the linear probe after. Their defaults are CRD's code base's; the batch
statistics of SP, RKD and PKT are over the whole batch (stats_groups=1, one GPU as the
original). The paper reports, per method, the best of a sweep of the loss scale over
{0.5, 1, 2, 4, 8, 16, 32}: run each value with --config.method.loss_scale.

Recipe: CRD's (recipes.cifar32_recipe: 240 epochs, SGD lr 0.05, x0.1 at 150/180/210, wd 5e-4)
with URepDistiller's batch of 128. FT first pre-trains its paraphraser for 30 epochs (270 in
all, the schedule shifted by 30), at lr 0.01 for ResNet students (paraphraser_weight 0.2 of
the schedule's 0.05) as the original. The published numbers come from URepDistiller's linear
evaluation (100 epochs of SGD on the frozen student, lr 0.1 decayed at 50/70/90, random
crops); scripts/probe.py fits its probe on fixed centre-crop embeddings.

Published linear-eval top-1 (CoSS supplement Table 1):

  method  resnet56,resnet20  vgg13,vgg8  resnet32x4,resnet8x4
  at      49.00              56.22       43.11
  sp      63.14              71.62       62.51
  vid     68.61              73.65       69.60
  rkd     56.28              44.50       32.33
  pkt     61.58              71.81       64.53
  ft      46.63              39.71       36.64
  nst     25.62              42.78       41.27
  crd     65.03              69.73       65.78
  srrl    69.31              72.85       69.19

Not here: DIST (67.13, 73.40, 67.67) distils logits only and the supplement does not say what
it compared once the heads were removed; CoSS itself (71.11, 74.58, 73.90) is
configs/coss_cifar32.py.
"""

from jaxkd import recipes
from jaxkd.errors import ConfigError

PAIRS = recipes.COSS_CIFAR_PAIRS[:3]
METHODS = ("at", "sp", "vid", "rkd", "pkt", "ft", "nst", "crd", "srrl")
WHOLE_BATCH_STATISTICS = ("sp", "rkd", "pkt")
PARAPHRASER_EPOCHS = 30.0  # RepDistiller's init_epochs
# RepDistiller pre-trains the paraphraser at lr 0.01 for ResNet and WRN students.
PARAPHRASER_LR_STUDENTS = ("resnet20", "resnet8x4", "wrn_16_2")


def get_config(arg="vid,resnet32x4,resnet8x4"):
    method, _, pair = (arg or "").partition(",")
    if method not in METHODS:
        raise ConfigError(f"config argument {arg!r}: the method must be one of "
                          f"{' '.join(METHODS)} (then teacher,student)")
    fields, extra_epochs = {}, 0.0
    if method in WHOLE_BATCH_STATISTICS:
        fields["stats_groups"] = 1
    if method == "ft":
        student = recipes.parse_pair(pair, PAIRS)[1]
        extra_epochs = PARAPHRASER_EPOCHS
        fields.update(paraphraser_epochs=PARAPHRASER_EPOCHS,
                      paraphraser_weight=0.2 if student in PARAPHRASER_LR_STUDENTS else 1.0)
    return recipes.cifar32_config(pair, PAIRS, f"{method}_unsup",
                                  batch_size=recipes.UNSUPERVISED_CIFAR32_BATCH,
                                  extra_epochs=extra_epochs, **fields)
