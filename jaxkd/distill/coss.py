"""CoSS (Singh & Wang 2023): unsupervised distillation of the teacher's embedding space.

Loss `L_co + lambda_ss * L_ss` (jaxkd.losses.coss_loss) between the student embedding, mapped
to the teacher's width by `Linear(D_s, 2048) -> ReLU -> Linear(2048, D_t)` when they differ,
and the teacher embedding. No labels and no logits: the method never reads batch["label"]
(set `config.supervised = False` so the trainer's train/top1 does not either) and trains with
the nearest-neighbour batches of jaxkd.data.neighbours (`config.dataset.sampler =
"neighbours"`). The space similarity normalises each feature over the batch: per device in
the official code, reproduced by `stats_groups` (0 = one group per device, 1 = the global
batch, n = n contiguous groups); each device's share then holds whole anchor groups.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.distill.base import register_method
from jaxkd.errors import ConfigError


class CoSSHead(nn.Module):
    hidden_dim: int
    out_dim: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden_dim)(x))
        return nn.Dense(self.out_dim)(x)


class CoSS(nn.Module):
    teacher_dim: int
    use_head: bool
    hidden_dim: int = 2048
    lambda_ss: float = 1.0
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    stats_groups: int = 1

    @nn.compact
    def __call__(self, student_out, teacher_out, batch, *, train: bool):
        del batch, train  # Unsupervised: labels are never read.
        student = student_out[1]["embedding"].astype(jnp.float32)
        if self.use_head:
            student = CoSSHead(self.hidden_dim, self.teacher_dim, name="head")(student)
        teacher = teacher_out[1]["embedding"]
        if student.shape[0] % self.stats_groups:
            raise ConfigError(f"batch {student.shape[0]} does not split into "
                              f"{self.stats_groups} CoSS groups")
        grouped = lambda x: x.reshape(self.stats_groups, -1, x.shape[-1])
        per_group = jax.vmap(lambda s, t: losses.coss_loss(
            s, t, lambda_ss=self.lambda_ss, student_temp=self.student_temp,
            teacher_temp=self.teacher_temp))(grouped(student), grouped(teacher))
        loss = jnp.mean(per_group)
        return loss, {"coss": loss}


@register_method("coss", defaults={"lambda_ss": 1.0, "student_temp": 0.1, "teacher_temp": 0.07,
                                   "hidden_dim": 2048, "stats_groups": 0})
def build(config, student, teacher, ctx):
    return CoSS(teacher_dim=teacher.embed_dim, use_head=student.embed_dim != teacher.embed_dim,
                hidden_dim=config.hidden_dim, lambda_ss=config.lambda_ss,
                student_temp=config.student_temp, teacher_temp=config.teacher_temp,
                stats_groups=ctx.num_devices if config.stats_groups == 0
                else config.stats_groups)
