r"""SEED, and SEED + space similarity, on ImageNet-1k: the CoSS supplement's section 3.

Command (teacher,student[,ss]; default res50,res18, the MoCo-v2 ResNet50 -> ResNet18 pair):

  python -m jaxkd.main --config=configs/seed_imagenet.py:res50,res18,ss --workdir=runs/seed_ss \
      --config.teacher.checkpoint=teachers/res50_mocov2
  python scripts/probe.py --model runs/seed_ss/export --dataset imagenet2012

SEED (jaxkd.distill.seed): a 2-layer MLP head on the student, a queue of 65536 teacher
outputs, student temperature 0.2, teacher temperature 1e-4; `ss` adds CoSS's space similarity
(weight 1, per device) between the head's output and the teacher output, with random batches
(k = 0) as the supplement. Unsupervised: k-NN during training, the linear probe after. The
teacher output is its pre-logits embedding; SEED's MoCo-v2 teacher distils its 128-d
projection instead: with a teacher checkpoint whose classifier is that projection, set
--config.method.teacher_output=logits.

Recipe: SEED's (URepDistiller's imagenet/main.py defaults): 200 epochs, batch 256, SGD lr 0.03
(x batch / 256), momentum 0.9, wd 1e-4, cosine after 5 warmup epochs. Augmentation: MoCo
v2's, as SEED's code: random resized crops (scale 0.2-1), colour jitter (0.4, 0.4, 0.4, 0.1)
with probability 0.8, grey-scale 0.2, Gaussian blur (sigma 0.1-2) 0.5, flips
(jaxkd.data.photometric: PIL's arithmetic, the blur a true Gaussian where PIL uses boxes).

Published linear-eval top-1 (CoSS supplement section 3): SEED 57.60; SEED + SS 58.30.
"""

from jaxkd import distill, recipes
from jaxkd.errors import ConfigError

BATCH = 256


def get_config(arg="res50,res18"):
    pair, with_ss = recipes.split_variant(arg, "ss")
    parts = [p.strip() for p in pair.split(",")]
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"config argument {arg!r} is not 'teacher,student[,ss]'")
    config = recipes.base_config()
    config.dataset.update(name="imagenet2012", image_size=224)
    config.teacher.name, config.student.name = (recipes.resolve_model(p) for p in parts)
    config.method = distill.method_config("seed", ss_weight=1.0 if with_ss else 0.0)
    config.batch_size = BATCH
    config.num_epochs = 200
    config.optimizer.update(name="sgd", lr=0.03 * BATCH / 256, momentum=0.9, weight_decay=1e-4,
                            schedule="cosine", warmup_epochs=5)
    config.augment.update(random_resized_crop=True, scale_min=0.2, colour_jitter_prob=0.8,
                          colour_jitter=(0.4, 0.4, 0.4, 0.1), grayscale_prob=0.2,
                          blur_prob=0.5, blur_sigma=(0.1, 2.0), flip=True)
    config.log_every_steps = 100
    config.eval_every_steps = 5000
    config.checkpoint_every_steps = 5000
    return config
