r"""RSD's sensitivity tables on CIFAR-100 (RSD paper, Tables 9-11) as populations, 3 seeds each.

Commands (pairs of the tables: swin_t,res18 mixer_b16,deit_t convnext_t,resmlp_s12):

  # everything: the lambda and kappa populations and the AAD-width suite
  python -m jaxkd.main --config=configs/rsd_sweep_cifar.py:swin_t,res18 \
      --workdir=runs/rsd_sweep_swin_res18
  # one table: lambda or kappa (one population, 15 or 12 students), aad (a suite)
  python -m jaxkd.main --config=configs/rsd_sweep_cifar.py:swin_t,res18,lambda \
      --workdir=runs/rsd_lambda_swin_res18 --config.teacher.checkpoint=teachers/swin_t_cifar100

The teacher export is read from teachers/<teacher>_cifar100 (scripts/convert_timm.py --out)
unless --config.teacher.checkpoint (one table) or --config.runs.<run>.teacher.checkpoint
(the suite) names another. Each setting is the mean ± std of seeds 0, 1, 2 (the paper
reports the mean of 3 runs): summary.md has one row per setting, sweep.png top-1 against the
swept value.

- lambda (`method.rsd_weight`): one population of 5 values x 3 seeds, one teacher forward per
  batch for the 15 students.
- kappa (`method.kappa`): one population of 4 values x 3 seeds.
- AAD expansion rate gamma (`method.expansion`): a suite of 5 populations of 3 seeds (the
  width changes the projector's shapes, so each width is its own population).

Published top-1 (%), CIFAR-100, paper recipe (8 GPUs x 128, 300 epochs):

| lambda | 0.05 | 0.075 | 0.1 | 0.15 | 0.2 |
|---|---|---|---|---|---|
| Swin-T -> ResNet18 | 83.36 | 83.80 | 83.92 | 84.10 | 83.75 |
| Mixer-B/16 -> DeiT-T | 78.16 | 78.53 | 78.50 | 78.60 | 78.48 |
| ConvNeXt-T -> ResMLP-S12 | 84.36 | 84.41 | 84.21 | 83.77 | 83.74 |

| gamma | 1/2 | 1 | 2 | 4 | 6 |
|---|---|---|---|---|---|
| Swin-T -> ResNet18 | 83.78 | 84.20 | 83.92 | 83.98 | 84.21 |
| Mixer-B/16 -> DeiT-T | 77.53 | 78.53 | 78.50 | 78.75 | 79.30 |
| ConvNeXt-T -> ResMLP-S12 | 82.92 | 83.33 | 84.21 | 84.06 | 84.18 |

| kappa | 0 | 0.001 | 0.01 | 0.02 |
|---|---|---|---|---|
| Swin-T -> ResNet18 | 83.90 | 83.73 | 83.92 | 84.01 |
| Mixer-B/16 -> DeiT-T | 78.50 | 78.78 | 78.50 | 77.42 |
| ConvNeXt-T -> ResMLP-S12 | 83.54 | 83.81 | 84.21 | 84.01 |

Defaults elsewhere: lambda 0.1, kappa 0.01, gamma 2 (as configs/rsd_cifar.py).
"""

import ml_collections

from jaxkd import recipes
from jaxkd.errors import ConfigError

PAIRS = (("swin_t", "res18"), ("mixer_b16", "deit_t"), ("convnext_t", "resmlp_s12"))
SEEDS = (0, 1, 2)
LAMBDAS = (0.05, 0.075, 0.1, 0.15, 0.2)
KAPPAS = (0.0, 0.001, 0.01, 0.02)
EXPANSIONS = {"half": 0.5, "1": 1.0, "2": 2.0, "4": 4.0, "6": 6.0}
TABLES = ("lambda", "kappa", "aad")


def _rsd(pair: str, description: str, **fields):
    config = recipes.distillation_config("cifar", pair, "rsd", rsd_weight=0.1, kappa=0.01,
                                         expansion=2.0)
    config.method.update(fields)
    config.teacher.checkpoint = f"teachers/{pair.split(',')[0]}_cifar100"
    config.description = description
    return config


def _lambda(pair):
    return recipes.population(_rsd(pair, "RSD, lambda (Table 9)"), seeds=SEEDS,
                              sweep={"method.rsd_weight": LAMBDAS})


def _kappa(pair):
    return recipes.population(_rsd(pair, "RSD, kappa (Table 11)"), seeds=SEEDS,
                              sweep={"method.kappa": KAPPAS})


def _suite(pair, title, runs):
    config = ml_collections.ConfigDict()
    config.title = f"RSD sensitivity, {pair}: {title}"
    config.run_order = tuple(runs)
    config.runs = ml_collections.ConfigDict(runs)
    return config


def _aad(pair):
    return {f"gamma_{name}": recipes.population(
        _rsd(pair, f"RSD, AAD expansion {value:g} (Table 10)", expansion=value), seeds=SEEDS)
        for name, value in EXPANSIONS.items()}


def get_config(arg="swin_t,res18"):
    parts = [p.strip() for p in (arg or "").split(",")]
    pair, table = ",".join(parts[:2]), (parts[2] if len(parts) == 3 else "")
    if tuple(parts[:2]) not in PAIRS or len(parts) > 3 or (table and table not in TABLES):
        raise ConfigError(f"config argument {arg!r}: use teacher,student[,table] with a pair "
                          f"of {' '.join(','.join(p) for p in PAIRS)} and a table of "
                          f"{', '.join(TABLES)}")
    if table == "lambda":
        return _lambda(pair)
    if table == "kappa":
        return _kappa(pair)
    if table == "aad":
        return _suite(pair, "AAD expansion (Table 10)", _aad(pair))
    return _suite(pair, "lambda, kappa, AAD expansion (Tables 9-11)",
                  {"lambda": _lambda(pair), "kappa": _kappa(pair), **_aad(pair)})
