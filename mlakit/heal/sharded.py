"""What healing does differently on several processes (FSDP2), behind one small object.

``Ranks(None)`` is one process: every method is what ``heal_model`` always did. ``Ranks(job)``
(a ``mlakit.parallel.Distributed``) shards student and teacher with FSDP2, gives each rank its
share of every global batch (equal shares, so the ranks' mean losses average to the
one-process loss, and FSDP2's averaged gradients are the one-process gradients), and
gathers parameters and optimizer state into the one-process format, so a state saved by N
processes resumes on M (1 included). Only rank 0 writes files, logs or draws progress.
"""

from __future__ import annotations

from typing import Any

import torch

from mlakit.errors import MlakitError
from mlakit.model import Transformer


class Ranks:
    def __init__(self, job=None) -> None:
        self.job = job
        self.world = 1 if job is None else job.world_size
        self.rank = 0 if job is None else job.rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check(self, options) -> None:
        if self.job is None:
            return
        if options.batch_size % self.world:
            raise MlakitError(f"--batch-size {options.batch_size} does not split evenly over {self.world} processes")
        if options.layerwise_steps > 0:
            raise MlakitError("--layerwise-init runs in one process only: leave it out on several processes")
        if options.compile:
            raise MlakitError("--compile with several processes is not supported yet (the compiled block would trace "
                              "FSDP's hooks); leave it out")

    def shard(self, student: Transformer, teacher: Transformer, names: list[str]) -> list[torch.nn.Parameter]:
        """FSDP2 on both models (several processes); the student's trainable parameters, in
        the order of ``names`` (``fully_shard`` replaces the parameter objects)."""
        if self.job is not None:
            from mlakit.parallel import is_sharded, shard_for_training

            for model in (student, teacher):
                if not is_sharded(model):  # a caller may have sharded it already (built on the meta device)
                    shard_for_training(model, self.job.mesh)
        named = dict(student.named_parameters())
        return [named[n] for n in names]

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch ``[batch_size, s]``."""
        if self.job is None:
            return batch
        size = batch.shape[0] // self.world
        return batch[self.rank * size:(self.rank + 1) * size]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of ``value`` (a copy; no gradient flows through the reduction)."""
        if self.job is None:
            return value
        import torch.distributed as dist

        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world

    def clip(self, params: list[torch.nn.Parameter], max_norm: float) -> None:
        if self.job is None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            from mlakit.parallel import clip_grad_norm

            clip_grad_norm(params, max_norm)

    # -------------------------------------------------------------- state in the one-process format
    def parameters_state(self, student: Transformer, names: list[str]) -> dict[str, torch.Tensor]:
        """Full CPU tensors of the trainable parameters (on rank 0; ``{}`` elsewhere)."""
        if self.job is None:
            named = dict(student.named_parameters())
            return {n: named[n].detach().cpu() for n in names}
        from mlakit.parallel import full_state_dict

        return full_state_dict(student, names)

    def optimizer_state(self, student: Transformer, optimizer: torch.optim.Optimizer,
                        names: list[str]) -> dict[str, Any]:
        if self.job is None:
            return optimizer.state_dict()
        from mlakit.parallel import full_optimizer_state

        return full_optimizer_state(student, optimizer, names)

    def load(self, student: Transformer, params: dict[str, torch.Tensor]) -> None:
        if self.job is None:
            with torch.no_grad():
                named = dict(student.named_parameters())
                for name, tensor in params.items():
                    named[name].copy_(tensor)
            return
        from mlakit.parallel import load_full_state_dict

        load_full_state_dict(student, params)

    def load_optimizer(self, student: Transformer, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                       names: list[str]) -> None:
        if self.job is None:
            optimizer.load_state_dict(state)
            return
        from mlakit.parallel import load_full_optimizer_state

        load_full_optimizer_state(student, optimizer, state, names)
