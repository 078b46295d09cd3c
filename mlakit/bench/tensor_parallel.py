"""decode-e2e-v1 under ``--tensor-parallel`` (``torchrun --nproc-per-node N``): what a row adds,
which variants cannot split, and the notes on what the run leaves out (docs/distributed.md)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from mlakit.errors import MlakitError


def row_fields(job, model, cache_bytes: int) -> Dict[str, Any]:
    """A decode row's extra keys: the world size, this rank's cache bytes, and a note on what
    each rank caches. Nothing without a job (one process's rows keep their keys)."""
    if job is None:
        return {}
    tp, config = job.world_size, model.config  # config: localized (per-rank heads)
    if config.is_mla:
        what = "the latent cache is replicated on each rank"
    else:
        what = f"{config.n_kv_heads} of {config.n_kv_heads * tp} KV heads cached per rank"
    size = f"{cache_bytes / 2 ** 20:.1f} MiB" if cache_bytes >= 2 ** 20 else f"{cache_bytes / 2 ** 10:.1f} KiB"
    return dict(tensor_parallel=tp, cache_bytes_per_rank=cache_bytes, note=f"TP {tp}: {what} ({size} per rank)")


def split_error(job, config) -> Optional[str]:
    """Why ``config`` does not split over the job's ranks (MQA's one KV head on 2), or None."""
    from mlakit.parallel import check_decode_split

    try:
        check_decode_split(config, job.world_size)
    except MlakitError as exc:
        return str(exc)
    return None


def notes(job, opts) -> List[str]:
    """One note each: the run is tensor parallel, and what --tensor-parallel leaves out."""
    out = [f"tensor parallel over {job.world_size} ranks (torch.distributed, {job.mesh.device_type}): "
           "rank 0's timings; bytes, cache and bandwidth fraction per rank"]
    if opts.hf or opts.hf_static:
        out.append("transformers baseline: not run under --tensor-parallel (it is one process's)")
    if opts.max_batch_context:
        out.append("largest-batch search: not run under --tensor-parallel (an out-of-memory try on one "
                   "rank would leave the others waiting in a collective)")
    if opts.profile_path:
        out.append("--profile: not run under --tensor-parallel")
    return out
