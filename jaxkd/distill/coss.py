"""CoSS (Singh & Wang 2023): unsupervised distillation of the teacher's embedding space.

Loss `co_weight * L_co + lambda_ss * L_ss` (jaxkd.losses.coss_loss) between the student
embedding, mapped to the teacher's width by `Linear(D_s, 2048) -> ReLU -> Linear(2048, D_t)`
when they differ, and the teacher embedding. No labels and no logits: the method never reads
batch["label"] (it is registered with labels=False, so the trainer reads none either and
evaluates by k-NN) and trains with the nearest-neighbour batches of jaxkd.data.neighbours
(sampler "neighbours"; the paper's k = 0 is `config.dataset.sampler = "random"`). The space
similarity normalises each feature over the batch: per device in the official code,
reproduced by `stats_groups` (0 = one group per device, 1 = the global batch, n = n
contiguous groups); each device's share then holds whole anchor groups.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.distill.base import Method, Term, batch_groups, derived, register_method
from jaxkd.errors import ConfigError
from jaxkd.models.layers import batch_norm


class CoSSHead(nn.Module):
    hidden_dim: int
    out_dim: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden_dim)(x))
        return nn.Dense(self.out_dim)(x)


@register_method("coss", teacher_logits=False, labels=False, sampler="neighbours")
class CoSS(Method):
    lambda_ss: float = 1.0
    co_weight: float = 1.0  # 0: the space term alone (the paper's L_ss ablation)
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    hidden_dim: int = 2048
    stats_groups: int = 0  # 0: one group per device
    teacher_dim: int = derived()
    use_head: bool = derived()
    num_groups: int = derived()  # stats_groups resolved

    @classmethod
    def derive(cls, config, student, teacher, ctx):
        return {**super().derive(config, student, teacher, ctx),
                "teacher_dim": teacher.embed_dim,
                "use_head": student.embed_dim != teacher.embed_dim,
                "num_groups": batch_groups(config["stats_groups"], ctx)}

    @nn.compact
    def __call__(self, student, teacher, batch, *, train: bool):
        del batch, train  # Unsupervised: labels are never read.
        embedding = student.features["embedding"].astype(jnp.float32)
        if self.use_head:
            embedding = CoSSHead(self.hidden_dim, self.teacher_dim, name="head")(embedding)
        target = teacher.features["embedding"]
        if embedding.shape[0] % self.num_groups:
            raise ConfigError(f"batch {embedding.shape[0]} does not split into "
                              f"{self.num_groups} CoSS groups")
        grouped = lambda x: x.reshape(self.num_groups, -1, x.shape[-1])
        per_group = jax.vmap(lambda s, t: losses.coss_loss(
            s, t, lambda_ss=self.lambda_ss, student_temp=self.student_temp,
            teacher_temp=self.teacher_temp, co_weight=self.co_weight))(grouped(embedding),
                                                                        grouped(target))
        return {"coss": Term(1.0, jnp.mean(per_group))}


@register_method("coss_bn", labels=False)
class CoSSBatchNorm(Method):
    """CoSS supplement section 4 (its Table 4 "BN" row): the student embedding (mapped to the
    teacher's width by CoSS's head when they differ) standardised over the batch by a
    BatchNorm whose affine scale and shift map it to the teacher's unnormalised embedding
    space, then the MSE to the teacher embedding (mean over the batch and the dimensions).
    Unsupervised as CoSS; `loss_scale` weighs the term. The table compares it with CoSS at
    k = 0 (random batches, sampler "random")."""

    loss_scale: float = 1.0
    hidden_dim: int = 2048
    teacher_dim: int = derived()
    use_head: bool = derived()

    @classmethod
    def derive(cls, config, student, teacher, ctx):
        return {**super().derive(config, student, teacher, ctx),
                "teacher_dim": teacher.embed_dim,
                "use_head": student.embed_dim != teacher.embed_dim}

    @nn.compact
    def __call__(self, student, teacher, batch, *, train: bool):
        del batch  # Unsupervised: labels are never read.
        embedding = student.features["embedding"].astype(jnp.float32)
        if self.use_head:
            embedding = CoSSHead(self.hidden_dim, self.teacher_dim, name="head")(embedding)
        mapped = batch_norm(train, name="bn")(embedding)
        return {"coss_bn": Term(self.loss_scale,
                                losses.mse_loss(mapped, teacher.features["embedding"]))}
