"""Baselines on stage feature maps, as CRD's code base (RepDistiller) trains them: AT, NST,
VID and factor transfer (FT). Each is CE + weight * its loss (RepDistiller's gamma 1, alpha 0,
beta = the weight; defaults are its scripts' betas), with `<name>_unsup` variants
(jaxkd.distill.feature). Stages pair as jaxkd.distill.feature describes; maps of different
sizes are matched by adaptive average pooling of the larger, as the original.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import losses
from jaxkd.distill.base import Term, derived
from jaxkd.distill.feature import (FeatureMethod, paired_stage_count, register_feature_method,
                                   stage_grid)
from jaxkd.distill.ofa import token_layout
from jaxkd.errors import ConfigError
from jaxkd.losses.maps import VID_EPS
from jaxkd.models.layers import batch_norm, torch_linear_init


def _per_stage(name, weight, values):
    """{name: Term(weight, sum)} plus each stage's value as a diagnostic."""
    return {name: Term(weight, sum(values)),
            **{f"{name}_stage{i + 1}": Term(None, v) for i, v in enumerate(values)}}


class _PairedStages(FeatureMethod):
    """A method on the paired stages' grids (jaxkd.distill.feature)."""

    num_stages: int = derived()

    @classmethod
    def derive(cls, config, student, teacher, ctx):
        return {**super().derive(config, student, teacher, ctx),
                "num_stages": paired_stage_count(student, teacher)}

    def stage_pairs(self, student, teacher):
        """[(student grid, teacher grid)] of the paired stages."""
        return [(stage_grid(s), stage_grid(t)) for s, t in
                zip(student.features["stages"][:self.num_stages],
                    teacher.features["stages"][:self.num_stages])]


@register_feature_method("at")
class AttentionTransfer(_PairedStages):
    """Attention transfer (Zagoruyko & Komodakis 2017): CE + at_weight * sum over the paired
    stages of losses.at_loss (p = 2: squared activations averaged over channels, normalised).
    at_weight 1000 is RepDistiller's beta; the AT paper's own code weighs each stage by
    beta / 2 = 500 on CIFAR and by beta = 1000 on ImageNet."""

    at_weight: float = 1000.0
    p: float = 2.0

    def distill_terms(self, student, teacher, batch, *, train: bool):
        del batch, train
        return _per_stage("at", self.at_weight, [
            losses.at_loss(s, t, p=self.p) for s, t in self.stage_pairs(student, teacher)])


@register_feature_method("nst")
class NeuronSelectivityTransfer(_PairedStages):
    """Neuron selectivity transfer (Huang & Wang 2017): CE + nst_weight * sum over the paired
    stages of losses.nst_loss (polynomial-kernel MMD); nst_weight 50 as RepDistiller."""

    nst_weight: float = 50.0

    def distill_terms(self, student, teacher, batch, *, train: bool):
        del batch, train
        return _per_stage("nst", self.nst_weight, [
            losses.nst_loss(s, t) for s, t in self.stage_pairs(student, teacher)])


class VIDRegressor(nn.Module):
    """1x1 conv -> ReLU -> 1x1 conv -> ReLU -> 1x1 conv, no biases, the hidden and output
    widths the teacher's channels (RepDistiller's VIDLoss(s, t, t)), PyTorch's default init."""

    channels: int

    @nn.compact
    def __call__(self, x):
        def conv(x, name):
            kernel_init, _ = torch_linear_init(x.shape[-1])
            return nn.Conv(self.channels, (1, 1), use_bias=False, kernel_init=kernel_init,
                           name=name)(x)

        x = nn.relu(conv(x, "conv1"))
        x = nn.relu(conv(x, "conv2"))
        return conv(x, "conv3")


@register_feature_method("vid")
class VariationalInformationDistillation(_PairedStages):
    """VID (Ahn et al. 2019): CE + vid_weight * sum over the paired stages of losses.vid_loss,
    the teacher map's Gaussian likelihood under a regressor of the (pooled) student map and a
    learned per-channel variance softplus(log_scale) + 1e-5, log_scale starting at
    log(exp(init_variance - 1e-5) - 1). vid_weight 1 and init_variance 5 as RepDistiller."""

    vid_weight: float = 1.0
    init_variance: float = 5.0

    @classmethod
    def derive(cls, config, student, teacher, ctx):
        if config["init_variance"] <= VID_EPS:
            raise ConfigError(f"vid init_variance must exceed {VID_EPS}, got "
                              f"{config['init_variance']}")
        return super().derive(config, student, teacher, ctx)

    def distill_terms(self, student, teacher, batch, *, train: bool):
        del batch, train
        start = float(np.log(np.expm1(self.init_variance - VID_EPS)))
        values = []
        for i, (s, t) in enumerate(self.stage_pairs(student, teacher)):
            s, t = losses.pool_to_smaller(s.astype(jnp.float32), t)
            channels = t.shape[-1]
            predicted = VIDRegressor(channels, name=f"regressor{i + 1}")(s)
            log_scale = self.param(f"log_scale{i + 1}", nn.initializers.constant(start),
                                   (channels,), jnp.float32)
            values.append(losses.vid_loss(predicted, t, log_scale))
        return _per_stage("vid", self.vid_weight, values)


def _leaky_relu(x):
    return nn.leaky_relu(x, 0.1)


def _conv3x3(features: int, fan_in: int, name: str, transposed: bool = False) -> nn.Conv:
    """A 3x3 conv, padding 1, with bias and PyTorch's default init. `transposed`: the stride-1
    ConvTranspose2d(3, padding 1) of the original, the same function class as a conv; PyTorch
    sizes its init by the output channels (`fan_in` = 9 * out then)."""
    _, bias_init = torch_linear_init(fan_in)
    kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out" if transposed
                                                   else "fan_in", "uniform")
    return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), kernel_init=kernel_init,
                   bias_init=bias_init, name=name)


class ParaphraserEncoder(nn.Module):
    """Three 3x3 convs C_t -> C_t -> f -> f, each with LeakyReLU(0.1), no BN (the original's
    use_bn=False)."""

    factor_channels: int

    @nn.compact
    def __call__(self, x):
        for i, out in enumerate((x.shape[-1], self.factor_channels, self.factor_channels)):
            x = _leaky_relu(_conv3x3(out, 9 * x.shape[-1], f"conv{i + 1}")(x))
        return x


class ParaphraserDecoder(nn.Module):
    """The paraphraser's decoder: (transposed) 3x3 convs f -> f -> C_t -> C_t with
    LeakyReLU(0.1) after each, as the original (which ends with the activation too)."""

    channels: int

    @nn.compact
    def __call__(self, x):
        for i, out in enumerate((x.shape[-1], self.channels, self.channels)):
            x = _leaky_relu(_conv3x3(out, 9 * out, f"deconv{i + 1}", transposed=True)(x))
        return x


class Translator(nn.Module):
    """The student's translator: 3x3 convs C_s -> C_s -> f -> f, each with BN and
    LeakyReLU(0.1)."""

    factor_channels: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        for i, out in enumerate((x.shape[-1], self.factor_channels, self.factor_channels)):
            x = _conv3x3(out, 9 * x.shape[-1], f"conv{i + 1}")(x)
            x = _leaky_relu(batch_norm(train, name=f"bn{i + 1}")(x))
        return x


def _grid_of(shape) -> tuple[int, int, int]:
    """(H, W, C) of a stage shape viewed as a grid (jaxkd.distill.feature.stage_grid)."""
    if len(shape) == 3:
        return tuple(shape)
    _, side = token_layout(shape)
    return side, side, shape[-1]


@register_feature_method("ft")
class FactorTransfer(FeatureMethod):
    """Factor transfer (Kim et al. 2018) on the last stage: CE + ft_weight *
    losses.factor_transfer_loss(translator(student), paraphraser_encoder(teacher)), ft_weight
    200 and factor rate 0.5 as RepDistiller.

    The original first trains the paraphraser alone for 30 epochs (init_epochs) to
    reconstruct the teacher's last-stage map (MSE), then freezes it and trains the student and
    the translator. Here both phases run in one training run, split by step count: the first
    `paraphraser_epochs` epochs of steps (steps per epoch = train examples // batch, as the
    trainer counts them) carry only the reconstruction term (weight paraphraser_weight), the
    rest only CE and the FT term (their weights switch between 0 and their values; all are
    logged throughout). The paraphraser's encoder is copied into the non-trainable collection
    'paraphraser' until the first main step, which sees it as pre-training left it, and the FT
    term reads that copy: the paraphraser stays exactly as pre-trained although its trainable
    parameters still see the optimiser's weight decay afterwards.

    Deviations, because one optimiser and one schedule run both phases: during pre-training
    the student and the translator get no loss gradient, but the optimiser's weight decay
    still shrinks their kernels and the student's BN statistics follow the batches (the
    original leaves both untouched); the schedule must include the pre-training epochs
    (configs shift it); the original's pre-training lr (0.01 for ResNet/WRN students, else the
    main lr) is emulated by `paraphraser_weight` = pre-training lr / the schedule's lr (exact
    for plain SGD, up to the weight decay term). In `ft_unsup` the swept `loss_scale` leaves
    the reconstruction term alone, as the original pre-training does not see the distillation
    weight. The decoder's transposed 3x3 convs (stride 1, padding 1) are written as 3x3 convs,
    the same functions, with PyTorch's transposed-conv init bounds.
    """

    unscaled_terms = ("ft_reconstruction",)

    ft_weight: float = 200.0
    factor_rate: float = 0.5
    p1: float = 2.0
    p2: float = 1.0
    paraphraser_epochs: float = 30.0
    paraphraser_weight: float = 1.0
    teacher_grid: tuple[int, int, int] = derived()
    num_train_examples: int = derived()

    @classmethod
    def derive(cls, config, student, teacher, ctx):
        paired_stage_count(student, teacher)  # every stage a square grid
        if config["paraphraser_epochs"] <= 0:
            raise ConfigError("factor transfer needs the paraphraser pre-trained first: "
                              f"paraphraser_epochs must be > 0, got "
                              f"{config['paraphraser_epochs']}")
        if ctx.num_train_examples < 1:
            raise ConfigError("factor transfer counts its pre-training in epochs: the trainer "
                              "must pass MethodContext.num_train_examples")
        grid = _grid_of(teacher.stage_shapes[-1])
        if int(grid[-1] * config["factor_rate"]) < 1:
            raise ConfigError(f"factor_rate {config['factor_rate']} leaves no factor channel "
                              f"of the teacher's {grid[-1]}")
        return {**super().derive(config, student, teacher, ctx), "teacher_grid": grid,
                "num_train_examples": ctx.num_train_examples}

    def _terms_and_phase(self, student, teacher, *, train: bool):
        """(terms, weight of the main phase: 0.0 while pre-training, else 1.0)."""
        batch_size = student.logits.shape[0]
        pretrain_steps = int(round(self.paraphraser_epochs *
                                   max(self.num_train_examples // batch_size, 1)))
        steps = self.variable("counters", "steps", lambda: jnp.zeros((), jnp.int32))
        pretraining = steps.value < pretrain_steps
        # The first main step still sees the encoder as the last pre-training step left it.
        copying = steps.value <= pretrain_steps
        if train:
            steps.value = steps.value + 1
        main = 1.0 - pretraining.astype(jnp.float32)

        factor_channels = int(self.teacher_grid[-1] * self.factor_rate)
        encoder = ParaphraserEncoder(factor_channels)
        decoder = ParaphraserDecoder(self.teacher_grid[-1])

        def init_paraphraser(rng):
            grid = jnp.zeros((1, *self.teacher_grid), jnp.float32)
            rng_encoder, rng_decoder = jax.random.split(rng)
            factor = jnp.zeros((1, *self.teacher_grid[:2], factor_channels), jnp.float32)
            return {"encoder": encoder.init(rng_encoder, grid)["params"],
                    "decoder": decoder.init(rng_decoder, factor)["params"]}

        paraphraser = self.param("paraphraser", init_paraphraser)
        frozen = self.variable("paraphraser", "encoder",
                               lambda: jax.tree.map(jnp.asarray, paraphraser["encoder"]))
        encoder_params = jax.tree.map(
            lambda copy, live: jnp.where(copying, jax.lax.stop_gradient(live), copy),
            frozen.value, paraphraser["encoder"])
        if train:
            frozen.value = encoder_params

        target = stage_grid(teacher.features["stages"][-1]).astype(jnp.float32)
        reconstruction = decoder.apply({"params": paraphraser["decoder"]},
                                       encoder.apply({"params": paraphraser["encoder"]}, target))
        factor_t = encoder.apply({"params": encoder_params}, target)
        factor_s = Translator(factor_channels, name="translator")(
            stage_grid(student.features["stages"][-1]).astype(jnp.float32), train=train)
        terms = {
            "ft": Term(self.ft_weight * main, losses.factor_transfer_loss(
                factor_s, factor_t, p1=self.p1, p2=self.p2)),
            "ft_reconstruction": Term(self.paraphraser_weight * (1.0 - main),
                                      losses.mse_loss(reconstruction, target)),
        }
        return terms, main

    def distill_terms(self, student, teacher, batch, *, train: bool):
        del batch
        return self._terms_and_phase(student, teacher, train=train)[0]

    @nn.compact
    def __call__(self, student, teacher, batch, *, train: bool):
        terms, main = self._terms_and_phase(student, teacher, train=train)
        return {"ce": Term(main, self.supervised_loss(student.logits, batch["label"])),
                **terms}
