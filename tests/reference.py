"""Plain torch optimizers that run as shardopt's shards do, for bit-exact comparisons.

shardopt's shards run Adam/AdamW with torch's fused kernel when the user chose neither ``fused`` nor
``foreach`` (``shardopt.actor.shard.fuses_by_default``), while ``param_groups`` and ``state_dict``
keep showing the user's choice (``fused: None``). :func:`run_as_shards` gives a torch optimizer the
same behaviour through its public hooks, so tests can demand identical numbers (under a GradScaler
too: like torch's own fused optimizers, it then takes the scale into the kernel).
"""

from __future__ import annotations

import torch

from shardopt.core.param_groups import fuses_by_default


def run_as_shards(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Makes ``optimizer`` step its groups as shards would and report them as torch would."""
    cls = type(optimizer)
    auto: set[int] = set()

    def fuse(opt, args, kwargs):
        for group in opt.param_groups:
            # shards keep torch's default path for groups fused kernels cannot take
            fusable = all(p.is_floating_point() for p in group["params"])
            if fusable and fuses_by_default(cls, group):
                group["fused"] = True
                auto.add(id(group))

    def report_users_choice(opt, state_dict):
        for group, packed in zip(opt.param_groups, state_dict["param_groups"]):
            if id(group) in auto:
                packed["fused"] = None

    def lay_out_like_params(opt):
        # torch's fused CPU kernels need state laid out like its parameter (a loaded state dict
        # is contiguous); a shard's parameters and state are always contiguous
        for p, state in opt.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    if value.stride() != p.stride():
                        state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)

    optimizer.register_step_pre_hook(fuse)
    optimizer.register_state_dict_post_hook(report_users_choice)
    optimizer.register_load_state_dict_post_hook(lay_out_like_params)
    fuse(optimizer, (), {})
    if auto:  # as torch's fused optimizers do: GradScaler hands the scale to the kernel
        optimizer._step_supports_amp_scaling = True
    return optimizer
