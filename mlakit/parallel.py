"""Several processes through PyTorch's own distributed stack (torchrun, DeviceMesh, FSDP2, DTensor TP).

One process per device, started by ``torchrun --nproc-per-node N -m mlakit ...``; each reads
its rank from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). The backend is
NCCL on CUDA and gloo on the CPU, where 2-4 processes on one machine test every piece.

- ``shard_for_training(model, mesh)``: FSDP2 (``torch.distributed.fsdp.fully_shard``) per block,
  then the root (embeddings, final norm, output head); every parameter becomes a DTensor shard.
- ``parallelize_for_decode(model, mesh)``: tensor parallelism for decode
  (``torch.distributed.tensor.parallel.parallelize_module``): query heads (GQA: and KV heads)
  and the MLP's hidden units split across ranks, one all-reduce after ``wo`` and one after
  ``w2`` per block; then ``localize_heads`` makes the head counts local in one place.
- Full (gathered) state dicts of sharded models and their optimizers, in the same format as
  one process writes, so that a healing state resumes on any number of processes.

Nothing here runs unless a caller asks for several processes: one process never initialises
a process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from mlakit.attention import GQAttention, MLAttention
from mlakit.errors import MlakitError
from mlakit.model import Transformer

# The process group's timeout: rank 0 may write the teacher's text (minutes to an hour) while
# the other ranks wait for it in a broadcast. Override with MLAKIT_DIST_TIMEOUT_MINUTES.
DEFAULT_TIMEOUT_MINUTES = 120.0


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int
    device: str  # "cuda:<local_rank>" or "cpu"
    mesh: Any  # a 1-D torch.distributed.device_mesh.DeviceMesh over all ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CURRENT: Distributed | None = None
_JOINED = False  # this process has been a rank of a job (``init``); ``leave`` ends such a process


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> Distributed | None:
    """The job this process belongs to (``init``), or None in a single process."""
    return _CURRENT


def init(device: str | None = None) -> Distributed:
    """Join the job torchrun started: a process group (NCCL on CUDA, gloo on the CPU) and a
    1-D device mesh over all ranks. ``device``: "cuda" or "cpu" (default: CUDA when available).
    Idempotent."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if "RANK" not in os.environ:
        raise MlakitError("several processes need torchrun: torchrun --nproc-per-node N -m mlakit ...")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise MlakitError("--device cuda was asked for, but no CUDA GPU is available")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise MlakitError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(local_rank)
    minutes = float(os.environ.get("MLAKIT_DIST_TIMEOUT_MINUTES", DEFAULT_TIMEOUT_MINUTES))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=minutes),
                                device_id=torch.device("cuda", local_rank) if use_cuda else None)
    mesh = init_device_mesh("cuda" if use_cuda else "cpu", (world,))
    _CURRENT = Distributed(rank, world, local_rank, f"cuda:{local_rank}" if use_cuda else "cpu", mesh)
    global _JOINED
    _JOINED = True
    return _CURRENT


def shutdown() -> None:
    global _CURRENT
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = None


def joined() -> bool:
    """Whether this process has joined a torchrun job (``init``), even if it has left it since."""
    return _JOINED


def leave(code: int) -> None:
    """End a process that joined a job with exit status ``code``, flushing stdout and stderr
    but skipping the interpreter's finalisation. gloo's worker threads outlive
    ``destroy_process_group`` (the group object lives on until the interpreter exits), and a
    worker still releasing a finished collective's tensors when finalisation starts asks for
    the GIL, is ended by Python inside a C++ destructor, and takes the process down with
    std::terminate (SIGABRT after the output was printed: 1 in 20-50 runs of a 2-rank CPU
    ``generate --tensor-parallel`` on 2 busy cores; core dump: ``ProcessGroupGloo::runLoop``
    -> ``~AsyncAllgatherCoalescedWork`` -> ``THPVariable_dealloc`` -> ``PyThread_exit_thread``).
    Nothing else is owed at exit: outputs are written and renamed before a command returns,
    and output locks (``flock``) go with the process."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said there
            pass
    os._exit(code)


def join_for_tensor_parallel(device: str | None, command: str) -> Distributed:
    """A command's ``--tensor-parallel``: join torchrun's job (``init`` on ``--device``, None:
    CUDA when available); only rank 0 prints
    (the other ranks' stdout is muted for the life of the process). Without torchrun: one
    MlakitError line naming the command line to use."""
    import sys

    if "RANK" not in os.environ:
        raise MlakitError(f"--tensor-parallel runs under torchrun: torchrun --nproc-per-node N -m mlakit {command} ...")
    job = init(device)
    if not job.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    return job


def broadcast_object(obj: Any, job: Distributed) -> Any:
    """Rank 0's ``obj`` on every rank (a tensor moves as a pickled CPU object)."""
    import torch.distributed as dist

    box = [obj if job.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------ FSDP2 (training)
def shard_for_training(model: Transformer, mesh, reshard_after_forward: bool = True) -> Transformer:
    """Shard ``model`` with FSDP2 over ``mesh``: one ``fully_shard`` group per block, then the
    root (embeddings, final norm, output head). Parameters become DTensor shards of
    ``1 / world`` each, moved to the mesh's device; a block's weights are all-gathered for
    its forward and backward and freed after (``reshard_after_forward``), gradients are
    reduce-scattered (averaged over ranks). ``model.hidden_states`` (what distillation
    runs) is registered as a forward method, so the root's parameters are gathered for it
    too. Frozen parameters (``requires_grad`` False) stay sharded and get no gradient."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # the root keeps FSDP's default: its weights stay gathered from its forward to the end of
    # backward, which the output head (run after ``hidden_states``, in chunks) relies on
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "hidden_states")
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: nn.Module, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """``{name: full CPU tensor}`` of a sharded model's parameters (``names``, default all), on
    rank 0 (other ranks get ``{}``). Every rank must call it (it all-gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if names is None else {n: state[n] for n in names if n in state}


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors (every rank holds them) into a sharded model's parameters (a subset is fine)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, Any]:
    """The optimizer's state gathered on rank 0, in the format one process's
    ``optimizer.state_dict()`` has (parameters numbered in the order of ``names``, the order
    the optimizer got them): a state saved by N processes loads into 1, and back."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if not optimizer.state:
        # before the first step: get_optimizer_state_dict would create the moments by stepping
        # once with zero gradients (AdamW's step count would then be one ahead)
        return optimizer.state_dict()
    state = get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not state:
        return {}
    index = {name: i for i, name in enumerate(names)}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [index[n] for n in group["params"]]}
                             for group in state["param_groups"]]}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                              names: list[str]) -> None:
    """``full_optimizer_state`` (or one process's ``optimizer.state_dict()``) into the optimizer
    of a sharded model; every rank passes the whole state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not state["state"]:
        return  # saved before the first step: nothing to restore (and no zero-gradient step)
    named = {"state": {names[i]: value for i, value in state["state"].items()},
             "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                              for group in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over sharded (DTensor) gradients: the norm of the whole gradient,
    reduced across ranks, then every shard scaled by the same factor."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()  # the shards' partial norms, reduced over the mesh
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def unsharded_copy(model: Transformer, job: Distributed) -> Transformer | None:
    """On rank 0, a plain CPU copy of a sharded model (for saving); None on the other ranks."""
    state = full_state_dict(model)
    if not job.is_main:
        return None
    copy = Transformer(model.config)
    copy.load_state_dict(state)
    return copy.to(next(iter(state.values())).dtype)


# ------------------------------------------------------------------ tensor parallelism (decode)
def decode_plan(model: Transformer, tp: int) -> dict[str, Any]:
    """The ``parallelize_module`` plan of tensor-parallel decode over ``tp`` ranks.

    Colwise (output features split; plain local tensors out): the query projection
    (``wq``, or ``wq_b`` after a replicated low-rank ``wq_a``), GQA's ``wk``/``wv``, MLA's
    ``wkv_b`` (each rank keeps its heads' up-projection), the MLP's ``w1``/``w3``.
    Rowwise (input features split; the partial sums all-reduced): ``wo`` and ``w2``.
    Replicated: embeddings, norms, MLA's ``wkv_a`` (the latent is every head's, so every rank
    computes and caches all of it). An untied output head is colwise and gathered when the
    vocabulary divides."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    config = model.config
    check_decode_split(config, tp)
    col, row = ColwiseParallel(), RowwiseParallel()
    plan: dict[str, Any] = {"feed_forward.w1": col, "feed_forward.w3": col, "feed_forward.w2": row,
                            "attention.wo": row}
    if config.is_mla:
        plan["attention.wq_b" if config.q_lora_rank else "attention.wq"] = col
        plan["attention.wkv_b"] = col
    else:
        plan.update({"attention.wq": col, "attention.wk": col, "attention.wv": col})
    full = {f"layers.*.{name}": style for name, style in plan.items()}
    if model.output is not None and config.vocab_size % tp == 0:
        full["output"] = ColwiseParallel(output_layouts=Replicate())
    return full


def check_decode_split(config, tp: int) -> None:
    """MlakitError unless ``config``'s query heads, GQA's KV heads and the MLP split over ``tp`` ranks."""
    if config.n_heads % tp:
        raise MlakitError(f"--tensor-parallel {tp}: the {config.n_heads} query heads do not split evenly")
    if not config.is_mla and config.n_kv_heads % tp:
        raise MlakitError(f"--tensor-parallel {tp}: the {config.n_kv_heads} KV heads do not split evenly "
                          "(GQA splits KV heads; at most n_kv_heads ranks)")
    if config.intermediate_size % tp:
        raise MlakitError(f"--tensor-parallel {tp}: the MLP's {config.intermediate_size} units do not split evenly")


def parallelize_for_decode(model: Transformer, mesh) -> Transformer:
    """Tensor-parallel ``model`` over ``mesh`` (in place; the model must already be on this
    rank's device): ``parallelize_module`` with ``decode_plan``, then ``localize_heads``.
    Every rank then runs the same forward on the same tokens; the logits are replicated."""
    from torch.distributed.tensor.parallel import parallelize_module

    tp = mesh.size()
    parallelize_module(model, mesh, decode_plan(model, tp))
    return localize_heads(model, tp)


def localize_heads(model: Transformer, tp: int) -> Transformer:
    """The one place where head counts become per rank: after the colwise split every
    attention module sees ``n_heads / tp`` query heads (GQA: ``n_kv_heads / tp`` KV heads),
    so its ``.view(b, s, heads, d)`` calls hold; ``model.config`` says the same, so caches
    made from it (``model.new_cache``) hold this rank's KV heads (GQA) or the whole latent
    (MLA: the latent is shared by all heads, so it is replicated on every rank).
    ``model.tensor_parallel`` records ``tp``."""
    config = model.config
    local = dict(n_heads=config.n_heads // tp)
    if not config.is_mla:
        local["n_kv_heads"] = config.n_kv_heads // tp
    for block in model.layers:
        attention = block.attention
        attention.n_heads = local["n_heads"]
        if isinstance(attention, GQAttention):
            attention.n_kv_heads = local["n_kv_heads"]
        elif not isinstance(attention, MLAttention):
            raise MlakitError(f"tensor parallelism does not know {type(attention).__name__}")
    model.config = config.replace(**local)
    model.tensor_parallel = tp
    return model
