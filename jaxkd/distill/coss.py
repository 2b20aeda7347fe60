"""CoSS (Singh & Wang 2023): unsupervised distillation of the teacher's embedding space.

Loss `L_co + lambda_ss * L_ss` (jaxkd.losses.coss_loss) between the student embedding, mapped
to the teacher's width by `Linear(D_s, 2048) -> ReLU -> Linear(2048, D_t)` when they differ,
and the teacher embedding. No labels and no logits: the method never reads batch["label"]
(it is registered with labels=False, so the trainer reads none either and evaluates by k-NN)
and trains with the nearest-neighbour batches of jaxkd.data.neighbours (sampler
"neighbours"). The space similarity normalises each feature over the batch: per device in
the official code, reproduced by `stats_groups` (0 = one group per device, 1 = the global
batch, n = n contiguous groups); each device's share then holds whole anchor groups.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.distill.base import Method, Term, derived, register_method
from jaxkd.errors import ConfigError


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
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    hidden_dim: int = 2048
    stats_groups: int = 0  # 0: one group per device
    teacher_dim: int = derived()
    use_head: bool = derived()
    num_groups: int = derived()  # stats_groups resolved

    @classmethod
    def derive(cls, config, student, teacher, ctx):
        stats_groups = config["stats_groups"]
        return {**super().derive(config, student, teacher, ctx),
                "teacher_dim": teacher.embed_dim,
                "use_head": student.embed_dim != teacher.embed_dim,
                "num_groups": ctx.num_devices if stats_groups == 0 else stats_groups}

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
            teacher_temp=self.teacher_temp))(grouped(embedding), grouped(target))
        return {"coss": Term(1.0, jnp.mean(per_group))}
