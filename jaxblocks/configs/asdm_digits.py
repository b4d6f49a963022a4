"""A-SDM on the digits diffusion UNet: block pruning with progressive incubation, CLME-CondConv,
GRI attention and feature distillation from the frozen teacher (paper 49).

Zhu et al., "A-SDM: Accelerating Stable Diffusion through Redundancy Removal and Performance
Optimization", https://arxiv.org/abs/2312.15516 (no official code). The run trains the teacher,
`diffusion_unet_digits`, exactly as `diffusion_digits` does (rerunning in the same workdir
reuses its checkpoint). The ``asdm`` report then trains the student
(`asdm_unet_digits`, `jaxblocks.models.asdm_unet`) with the same trainer in the incubation
stages listed in ``config.variants``: each stage removes more of the pruned blocks
(``mid_1`` → ``up_1_1`` → ``up_0_1``) and starts from the previous stage's student
(`prune_unet`), the last adds CLME-CondConv in ``mid_0`` (experts inherited from ``mid_1``) and
GRI attention on 2×2 regions. Every stage minimises the ``diffusion_distill`` objective: the
v-MSE plus MSE to the frozen teacher's output and to its features after the middle block and
each up level. The report tabulates teacher vs student: parameters, sampling wall time for the
same DDIM steps (median of interleaved runs), test v-MSE and the digit classifier's accuracy and
mean confidence on their samples, plus the teacher's per-block redundancy scores.

``get_config("smoke")`` shrinks it to a few steps for CPU tests.
"""

from jaxblocks.configs import diffusion_digits
from jaxblocks.configs.base import parse_switches

SWITCHES = ("smoke",)

# Incubation: (stage name, removed blocks, CondConv hosts, GRI window, steps).
INCUBATION = (
    ("incubate: -mid_1", ("mid_1",), (), 0, 250),
    ("incubate: -mid_1 -up_1_1", ("mid_1", "up_1_1"), (), 0, 250),
    ("student: -3 blocks + CondConv + GRI", ("mid_1", "up_1_1", "up_0_1"),
     (("mid_0", ("mid_1",)),), 2, 1000),
)  # fmt: skip


def _stages(extra_kwargs: dict, smoke_steps: int | None) -> tuple:
    out = []
    for name, removed, condconv, window, steps in INCUBATION:
        kwargs = dict(extra_kwargs, removed=removed, condconv=condconv, gri_window=window)
        out.append({
            "name": name,
            "overrides": (
                "task='diffusion_distill'",
                "model.name='asdm_unet_digits'",
                f"model.kwargs={kwargs!r}",
                f"train_steps={smoke_steps or steps}",
                f"optimizer.warmup_steps={1 if smoke_steps else 50}",
                f"eval_every={smoke_steps or steps}",
                f"checkpoint.every_steps={smoke_steps or steps}",
            ),
        })  # fmt: skip
    return tuple(out)


def get_config(arg: str | None = None):
    # The teacher is diffusion_digits's model, data and training; the stages are the variants.
    sw = parse_switches(arg)
    c = diffusion_digits.get_config(arg)
    c.reports = ("asdm",)
    c.variants = _stages({}, None)
    if "smoke" in sw:
        tiny = dict(c.model.kwargs)
        c.variants = _stages(tiny, 1)[::2]  # one incubation stage and the final student
    return c
