"""OFA-KD (Hao et al. 2023): the OFA loss on the final logits and on per-stage exit branches.

Total `CE + kd_weight * OFA(final logits) + ofa_weight * sum_k OFA(branch_k logits)`, every OFA
term against the teacher's final logits. Branches follow the official code (REFERENCE.md
section 2): for a CNN student, (4 - s) depthwise-separable downsampling blocks (or a 1x1 conv
at stage 4) to m = max(D_s, D_t) channels, average pool, Linear; for a token student (ViT,
Swin, Mixer, ResMLP), patch merging down to a 7x7 grid, max(4 - s, 1) ViT blocks, the class
token (or the token mean without one), Linear. Branch logits are never mixed into the
student's logits, and the branches live in the method, so the exported student has none.

As in the official code the branch input is NOT detached: each branch's parameters are
trained only by its own OFA loss, and that loss also reaches the student's stage feature.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.distill.base import Method, ModelSpec, Term, derived, register_method
from jaxkd.errors import ConfigError
from jaxkd.models.layers import (KAIMING_FAN_OUT, TORCH_LN_EPS, TRUNC_NORMAL_02, batch_norm,
                                 conv2d, layer_norm, torch_linear_init)
from jaxkd.models.vit import Attention, Mlp

FINAL_GRID = 7  # token branches merge patches down to 7 x 7 = 49 tokens
BRANCH_HEADS = 4  # attention heads of the token branches' ViT blocks
# The official code's init_weights: kaiming normal (fan_out, relu) convs, BN (1, 0),
# trunc-normal(0.02) Linear weights with zero biases; conv biases keep PyTorch's default.


def token_layout(stage_shape) -> tuple[int, int]:
    """(prefix tokens, grid side) of a stage: an NHWC map (H, W, C) or tokens (L, C).

    Token sequences hold a square patch grid after their prefix (class) tokens, as timm's
    ViTs; the prefix count is what remains after the largest square.
    """
    if len(stage_shape) == 3:
        height, width, _ = stage_shape
        if height != width:
            raise ConfigError(f"stage feature {stage_shape} is not a square map")
        return 0, height
    if len(stage_shape) == 2:
        side = math.isqrt(stage_shape[0])
        return stage_shape[0] - side * side, side
    raise ConfigError(f"stage feature shape {stage_shape} is neither (H, W, C) nor (L, C)")


def token_merges(grid: int) -> int:
    """Patch mergings of a token branch on a grid x grid stage, as the official code counts
    them: int(log2(grid / 7)), none below 14 x 14 (GELU after each but the last of 2+)."""
    return max(int(math.log2(grid / FINAL_GRID)), 0)


def as_tokens(feature):
    """[B, H, W, C] maps become [B, H*W, C] row-major tokens; token sequences pass through."""
    if feature.ndim == 4:
        return feature.reshape(feature.shape[0], -1, feature.shape[-1])
    return feature


def _classifier(num_classes: int, name: str = "head") -> nn.Dense:
    return nn.Dense(num_classes, kernel_init=TRUNC_NORMAL_02, bias_init=nn.initializers.zeros,
                    name=name)


class SepConv(nn.Module):
    """dw3x3/2 -> pw1x1 -> BN -> ReLU -> dw3x3 -> pw1x1 -> BN -> ReLU, no conv biases."""

    out_channels: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        channels = x.shape[-1]
        conv = {"kernel_init": KAIMING_FAN_OUT}
        x = conv2d(channels, 3, 2, groups=channels, name="dw1", **conv)(x)
        x = conv2d(channels, 1, name="pw1", **conv)(x)
        x = nn.relu(batch_norm(train, name="bn1")(x))
        x = conv2d(channels, 3, groups=channels, name="dw2", **conv)(x)
        x = conv2d(self.out_channels, 1, name="pw2", **conv)(x)
        return nn.relu(batch_norm(train, name="bn2")(x))


class CNNBranch(nn.Module):
    """Exit branch on a CNN student's stage `stage` (1-4) map, down to stride 32."""

    stage: int
    width: int  # m = max(D_s, D_t)
    num_classes: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        if self.stage == 4:
            _, bias_init = torch_linear_init(x.shape[-1])
            x = nn.Conv(self.width, (1, 1), kernel_init=KAIMING_FAN_OUT, bias_init=bias_init,
                        name="proj")(x)
        else:
            num_blocks = 4 - self.stage
            channels = x.shape[-1]
            for i in range(num_blocks):
                out_channels = self.width if i == num_blocks - 1 else 2 * channels
                x = SepConv(out_channels, name=f"sepconv_{i}")(x, train=train)
                channels *= 2
        return _classifier(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat (Swin's order) -> LayerNorm -> Linear without bias -> act."""

    out_dim: int
    gelu: bool

    @nn.compact
    def __call__(self, x):
        batch, length, channels = x.shape
        side = math.isqrt(length)
        if side * side != length or side % 2:
            raise ValueError(f"patch merging needs an even square grid, got {length} tokens")
        x = x.reshape(batch, side, side, channels)
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                             x[:, 1::2, 1::2]], axis=-1).reshape(batch, -1, 4 * channels)
        x = layer_norm(TORCH_LN_EPS, jnp.float32, "norm")(x)
        x = nn.Dense(self.out_dim, use_bias=False, kernel_init=TRUNC_NORMAL_02,
                     name="reduction")(x)
        return nn.gelu(x, approximate=False) if self.gelu else x


class BranchBlock(nn.Module):
    """timm 0.6.5's default ViT Block: LayerNorm eps 1e-5, no qkv bias, mlp ratio 4."""

    dim: int

    @nn.compact
    def __call__(self, x):
        y = layer_norm(TORCH_LN_EPS, jnp.float32, "norm1")(x)
        x = x + Attention(self.dim, BRANCH_HEADS, qkv_bias=False, name="attn")(y)
        y = layer_norm(TORCH_LN_EPS, jnp.float32, "norm2")(x)
        return x + Mlp(4 * self.dim, self.dim, name="mlp")(y)


class TokenBranch(nn.Module):
    """Exit branch on a token student's stage `stage` (1-4): prefix tokens skip the merging."""

    stage: int
    dim: int  # D_s
    num_classes: int
    num_prefix: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        del train
        x = as_tokens(x)
        prefix, patches = x[:, :self.num_prefix], x[:, self.num_prefix:]
        num_merges = token_merges(math.isqrt(patches.shape[1]))
        for i in range(num_merges):
            patches = PatchMerging(self.dim, gelu=i == 0 or i != num_merges - 1,
                                   name=f"merge_{i}")(patches)
        if patches.shape[-1] != self.dim:
            raise ValueError(f"stage {self.stage} tokens have {patches.shape[-1]} channels and no "
                             f"patch merging to the branch width {self.dim}")
        x = jnp.concatenate([prefix, patches], axis=1) if self.num_prefix else patches
        for i in range(max(4 - self.stage, 1)):
            x = BranchBlock(self.dim, name=f"block_{i}")(x)
        feature = x[:, 0] if self.num_prefix else jnp.mean(x, axis=1)
        return _classifier(self.num_classes)(feature)


class OFABranches(nn.Module):
    """The exit branches on the selected student stages (1-based); returns their logits."""

    student: ModelSpec
    teacher_dim: int
    stages: tuple[int, ...] = (1, 2, 3, 4)

    @nn.compact
    def __call__(self, stage_features, *, train: bool):
        logits = []
        for stage in self.stages:
            shape = self.student.stage_shapes[stage - 1]
            if self.student.token_stages:
                branch = TokenBranch(stage, self.student.embed_dim, self.student.num_classes,
                                     token_layout(shape)[0], name=f"stage{stage}")
            else:
                branch = CNNBranch(stage, max(self.student.embed_dim, self.teacher_dim),
                                   self.student.num_classes, name=f"stage{stage}")
            feature = stage_features[stage - 1].astype(jnp.float32)
            logits.append(branch(feature, train=train))
        return logits


def branch_losses(branch_logits, teacher_logits, labels, gammas, temperature):
    """(sum of the branches' OFA losses, {'ofa_stage<k>': loss}); `gammas` pairs each branch's
    stage with its exponent, as check_branch_config returns them."""
    parts = {}
    for (stage, gamma), logits in zip(gammas, branch_logits):
        parts[f"ofa_stage{stage}"] = losses.ofa_loss(logits, teacher_logits, labels, eps=gamma,
                                                     temperature=temperature)
    return sum(parts.values()), parts


def check_branch_config(student: ModelSpec, stages, eps: float, branch_eps
                        ) -> tuple[tuple[int, float], ...]:
    """Validated ((stage, gamma), ...): `branch_eps` empty means `eps` for every branch."""
    stages = tuple(int(s) for s in stages)
    if not stages or len(set(stages)) != len(stages) or not set(stages) <= {1, 2, 3, 4}:
        raise ConfigError(f"OFA stages must be distinct values in 1-4, got {stages}")
    if len(student.stage_shapes) != 4:
        raise ConfigError(f"student {student.name!r} has {len(student.stage_shapes)} stage "
                          "features; OFA branches need 4")
    if student.token_stages and student.embed_dim % BRANCH_HEADS:
        raise ConfigError(f"token branches use {BRANCH_HEADS} heads: student width "
                          f"{student.embed_dim} is not divisible by {BRANCH_HEADS}")
    for stage in stages:
        shape = student.stage_shapes[stage - 1]
        if not student.token_stages:
            if len(shape) != 3:
                raise ConfigError(f"CNN student {student.name!r} stage {stage} is {shape}, not "
                                  "a (H, W, C) map")
            continue
        grid = token_layout(shape)[1]
        if not token_merges(grid) and shape[-1] != student.embed_dim:
            raise ConfigError(
                f"student {student.name!r} stage {stage} has width {shape[-1]} on a {grid}x{grid} "
                f"grid: a token branch merges no patches below 14x14, so nothing maps it to the "
                f"branch width {student.embed_dim} (the official code fails here too); leave "
                f"stage {stage} out of `stages`")
        odd = [grid // 2 ** i for i in range(token_merges(grid)) if (grid // 2 ** i) % 2]
        if odd:
            raise ConfigError(f"student {student.name!r} stage {stage}: its token branch merges "
                              f"2x2 patches of a {odd[0]}x{odd[0]} grid, which is odd")
    branch_eps = tuple(float(e) for e in branch_eps) or (float(eps),) * len(stages)
    if len(branch_eps) != len(stages):
        raise ConfigError(f"branch_eps {branch_eps} needs one value per stage {stages} "
                          "(or none: eps for all)")
    return tuple(zip(stages, branch_eps))


def derive_branches(config, student: ModelSpec, teacher: ModelSpec) -> dict:
    """The `branches` and `branch_gammas` fields of a method with exit branches, from its
    `stages`, `eps` and `branch_eps` config fields."""
    gammas = check_branch_config(student, config["stages"], config["eps"], config["branch_eps"])
    return {"branches": OFABranches(student, teacher.embed_dim, tuple(s for s, _ in gammas)),
            "branch_gammas": gammas}


@register_method("ofa")
class OFA(Method):
    """CE + kd_weight * OFA(final logits, eps) + ofa_weight * sum_k OFA(branch_k, gamma_k)."""

    stages: tuple[int, ...] = (1, 2, 3, 4)
    eps: float = 1.0
    branch_eps: tuple[float, ...] = ()
    kd_weight: float = 1.0
    ofa_weight: float = 1.0
    temperature: float = 1.0
    branches: OFABranches = derived()
    branch_gammas: tuple[tuple[int, float], ...] = derived()

    @classmethod
    def derive(cls, config, student, teacher, ctx):
        return {**super().derive(config, student, teacher, ctx),
                **derive_branches(config, student, teacher)}

    def __call__(self, student, teacher, batch, *, train: bool):
        labels = batch["label"]
        kd = losses.ofa_loss(student.logits, teacher.logits, labels, eps=self.eps,
                             temperature=self.temperature)
        branch_logits = self.branches(student.features["stages"], train=train)
        ofa, parts = branch_losses(branch_logits, teacher.logits, labels, self.branch_gammas,
                                   self.temperature)
        return {"ce": Term(1.0, self.supervised_loss(student.logits, labels)),
                "kd": Term(self.kd_weight, kd),
                "ofa": Term(self.ofa_weight, ofa),
                **{name: Term(None, value) for name, value in parts.items()}}
