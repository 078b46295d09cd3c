"""``mlakit heal``: load student and teacher, get the data, distil, write the checkpoint.

Files: OUT (an mlakit checkpoint, written atomically at the end, with ``heal_log.json``
and ``heal_loss.png`` beside the weights) and, while a run is unfinished, the sibling
directory ``OUT.heal/`` (``state.safetensors``: parameters, optimizer, log; removed once OUT is
written) that ``--resume`` continues from.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from mlakit.errors import MlakitError
from mlakit.io import atomic_file, output_lock, write_text
from mlakit.heal.data import TeacherDataOptions, describe, load_data_file, teacher_data
from mlakit.heal.distill import LEGACY_STATE_FILENAME, STATE_FILENAME, HealOptions, HealResult, heal_model

LOG_FILENAME = "heal_log.json"
PLOT_FILENAME = "heal_loss.png"


def state_dir_for(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".heal")


def plot_loss(log: dict[str, Any], path: str | Path, title: str = "mlakit heal") -> bool:
    """Training loss (KL, smoothed) and held-out KL against tokens; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    tokens, kl = log["tokens"], log["kl"]
    if kl:
        window = max(1, len(kl) // 50)
        smooth = [sum(kl[max(0, i - window + 1):i + 1]) / len(kl[max(0, i - window + 1):i + 1])
                  for i in range(len(kl))]
        ax.plot(tokens, kl, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(tokens, smooth, color="tab:blue", label="train KL (smoothed)")
    val = [v for v in log.get("val", []) if v["kl"] == v["kl"]]  # drop NaN (no held-out windows)
    if val:
        ax.plot([v["tokens"] for v in val], [v["kl"] for v in val], "o-", color="tab:orange", label="held-out KL")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("KL(teacher || student) per token")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
    return True


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def heal(model: str, teacher: str, out: str | Path, options: HealOptions,
         data_options: TeacherDataOptions | None = None, data: str | None = None, data_range: str | None = None,
         device: str = "cpu", overwrite: bool = False, resume: bool = False, log=print,
         job=None) -> dict[str, Any]:
    """Heal the MLA checkpoint ``model`` toward ``teacher``; write ``out``. Returns a summary
    (``finished`` False when ``max_minutes`` ran out first: call again with ``resume``).

    ``job`` (``mlakit.parallel.init()``, under torchrun): every rank runs this; rank 0 gets
    the data and broadcasts it, the models train sharded with FSDP2 on ``job.device``, and
    rank 0 alone logs and writes. The whole run holds the lock of ``out`` (on rank 0): a
    second run toward the same ``out`` fails at once."""
    import contextlib

    lock = output_lock(out) if job is None or job.is_main else contextlib.nullcontext()
    with lock:
        return _heal(model, teacher, out, options, data_options, data, data_range, device, overwrite, resume, log,
                     job)


def _heal(model, teacher, out, options, data_options, data, data_range, device, overwrite, resume, log, job):
    out = Path(out)
    options.check()
    main = job is None or job.is_main
    if job is not None:
        device = job.device
        if not main:
            log, options = (lambda *a, **k: None), replace(options, progress=False)
    data_options = data_options or TeacherDataOptions(seq_len=options.seq_len)
    state_dir = _check_run(out, options, data_options, data, overwrite, resume, main, job)
    start = time.perf_counter()
    student, source = _load_models(model, teacher, options, device, job)
    tokenizer = source.tokenizer or student.tokenizer
    load_seconds = time.perf_counter() - start

    t = time.perf_counter()
    windows, data_info = _run_data(source.model, tokenizer, options, data_options, data, data_range, log, job)
    data_seconds = time.perf_counter() - t
    epochs = options.tokens / windows.numel()
    log(f"data: {windows.shape[0]} windows x {windows.shape[1]} tokens ({windows.numel():,}); "
        f"training on {options.tokens:,} tokens ({epochs:.1f} epochs), {options.steps} steps, "
        f"train={options.train}, lr {options.learning_rate:g}")

    if options.max_minutes is not None:  # the time limit counts from this call, data generation included
        options = replace(options, max_minutes=max(0.0, options.max_minutes - (time.perf_counter() - start) / 60))
    t = time.perf_counter()
    result: HealResult = heal_model(student.model, source.model, windows, options, state_dir, resume, log=log,
                                    job=job)
    seconds = {"load": load_seconds, "data": data_seconds, "train": time.perf_counter() - t}
    summary = _summary(model, teacher, out, options, result, device, data_info, seconds)
    full_log = {**summary, "log": result.log}
    if job is not None:
        summary["processes"] = job.world_size
        return _finish_sharded(student.model, out, tokenizer, summary, full_log, result.finished, state_dir,
                               overwrite, job)
    return _finish(student.model, out, tokenizer, summary, full_log, result, state_dir, overwrite)


def _check_run(out: Path, options: HealOptions, data_options: TeacherDataOptions, data, overwrite: bool,
               resume: bool, main: bool, job) -> Path:
    """Before loading anything: the settings, OUT and an unfinished run's state (removed with
    ``overwrite``, read with ``resume``); returns the state's directory."""
    if data_options.seq_len != options.seq_len:
        raise MlakitError("the teacher text and the training windows need the same --seq-len")
    if data is None:
        data_options.check()  # before loading anything: a bad --doc-tokens or --gen-batch fails at once
    if out.exists() and not overwrite:
        if resume:  # OUT is written when a run finishes, and its state removed then
            raise MlakitError(f"{out} already exists: its heal has finished, nothing is left to resume "
                              "(pass --overwrite to heal again)")
        raise MlakitError(f"{out} already exists (pass --overwrite to replace it)")
    state_dir = state_dir_for(out)
    if any((state_dir / name).exists() for name in (STATE_FILENAME, LEGACY_STATE_FILENAME)) and not resume:
        if not overwrite:
            raise MlakitError(f"{state_dir} holds an unfinished heal run: pass --resume to continue it, "
                              "or --overwrite to start over")
        if main:
            shutil.rmtree(state_dir)
    if job is not None:
        from mlakit.parallel import barrier

        barrier()  # every rank has checked OUT and its state before rank 0 removes anything
    if resume:
        from mlakit.heal.distill import load_state

        load_state(state_dir)  # a damaged or pickled state fails now, not after loading and the data
    return state_dir


def _load_models(model: str, teacher: str, options: HealOptions, device: str, job):
    """(student, teacher) ``LoadedModel``s, checked: an MLA student, one vocabulary, elastic ranks it has."""
    from mlakit.heal.elastic import elastic_choices
    from mlakit.loading import load

    # several processes: the student waits on the CPU, and FSDP2 moves each rank's shard to its GPU
    student = load(model, dtype=torch.float32, device="cpu" if job is not None else device)
    if not student.model.config.is_mla:
        raise MlakitError(f"{model} is not an MLA model: heal the converted checkpoint (mlakit convert) toward "
                          "the original (--teacher)")
    # the teacher only runs forward: bf16 on a GPU halves its time and memory
    source = load(teacher, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32, device=device)
    if source.model.config.vocab_size != student.model.config.vocab_size:
        raise MlakitError(f"{model} and the teacher {teacher} have different vocabularies")
    elastic_choices(student.model, options.elastic_ranks, options.elastic_min_fraction)  # fail before the data
    return student, source


def _run_data(teacher, tokenizer, options: HealOptions, data_options: TeacherDataOptions, data, data_range, log,
              job) -> tuple[torch.Tensor, dict[str, Any]]:
    """``_training_data`` in one process; under a job rank 0 reads or writes the text and every
    rank then holds it (and reads its share of each batch)."""
    if job is None:
        return _training_data(teacher, tokenizer, options, data_options, data, data_range, log)
    from mlakit.parallel import broadcast_object

    windows = data_info = failure = None
    if job.is_main:
        try:
            windows, data_info = _training_data(teacher, tokenizer, options, data_options, data, data_range, log)
        except MlakitError as error:
            failure = str(error)
    windows, data_info, failure = broadcast_object((windows, data_info, failure) if job.is_main else None, job)
    if failure is not None:
        raise MlakitError(failure)
    return windows, data_info


def _summary(model, teacher, out: Path, options: HealOptions, result: HealResult, device: str, data_info,
             seconds: dict[str, float]) -> dict[str, Any]:
    history = result.log
    return {"model": str(model), "teacher": str(teacher), "output": str(out), "finished": result.finished,
            "step": result.step, "steps": result.steps, "tokens": result.step * options.batch_size * options.seq_len,
            "device": _device_name(device), "data": data_info, "seconds": seconds,
            "kl_before": history.get("kl_before"),
            "kl_after": history["val"][-1]["kl"] if history["val"] else None,
            "tokens_per_second": history.get("tokens_per_second"),
            "tokens_per_second_overall": history.get("tokens_per_second_overall"),
            "compile": options.compile, "layerwise": history.get("layerwise")}


def _finish(model, out: Path, tokenizer, summary, full_log, result: HealResult, state_dir: Path,
            overwrite: bool) -> dict[str, Any]:
    """The end of a run in one process: OUT written with its log and plot (and the state
    removed), or, unfinished, the log and plot beside the state."""
    from mlakit.loading import save_checkpoint

    history = result.log
    if not result.finished:
        write_text(state_dir / LOG_FILENAME, json.dumps(full_log) + "\n")
        if importlib.util.find_spec("matplotlib") is not None:
            with atomic_file(state_dir / PLOT_FILENAME, overwrite=True) as tmp:
                plot_loss(history, tmp)
        return summary
    t = time.perf_counter()
    plotted = []

    def log_files(directory: Path) -> None:  # written inside the checkpoint before it is renamed in
        summary["seconds"]["save"] = time.perf_counter() - t
        full_log.update(summary)
        (directory / LOG_FILENAME).write_text(json.dumps(full_log) + "\n")
        plotted.append(plot_loss(history, directory / PLOT_FILENAME))

    save_checkpoint(model, out, tokenizer, overwrite=overwrite, extra=log_files)
    summary["plot"] = str(out / PLOT_FILENAME) if plotted[0] else None
    shutil.rmtree(state_dir, ignore_errors=True)  # the run is complete: OUT replaces its state
    return summary


def _training_data(teacher, tokenizer, options: HealOptions, data_options: TeacherDataOptions, data, data_range,
                   log) -> tuple[torch.Tensor, dict[str, Any]]:
    """The training windows and a description of them: ``data`` read, or text the teacher writes."""
    if data is not None:
        windows = load_data_file(data, tokenizer, options.seq_len, data_range, teacher.config.vocab_size)
        return windows, {"source": str(data), "range": data_range, **describe(windows)}
    if data_range is not None:
        raise MlakitError("--data-range needs --data FILE")
    generation: dict[str, Any] = {}
    windows = teacher_data(teacher, tokenizer, data_options, progress=options.progress, log=log, stats=generation)
    return windows, {"source": "teacher", **asdict(data_options), **describe(windows), "generation": generation}


def _finish_sharded(model, out: Path, tokenizer, summary, full_log, finished: bool, state_dir: Path,
                    overwrite: bool, job) -> dict[str, Any]:
    """The end of a run on several processes: every rank takes part in gathering the healed
    weights; rank 0 writes OUT (or the unfinished run's log) and removes the state."""
    from mlakit.loading import save_checkpoint
    from mlakit.parallel import barrier, unsharded_copy

    copy = unsharded_copy(model, job) if finished else None
    if job.is_main:
        if not finished:
            state_dir.mkdir(parents=True, exist_ok=True)
            (state_dir / LOG_FILENAME).write_text(json.dumps(full_log) + "\n")
            plot_loss(full_log["log"], state_dir / PLOT_FILENAME)
        else:
            t = time.perf_counter()
            save_checkpoint(copy, out, tokenizer, overwrite=overwrite)
            summary["seconds"]["save"] = time.perf_counter() - t
            full_log.update(summary)
            (out / LOG_FILENAME).write_text(json.dumps(full_log) + "\n")
            summary["plot"] = str(out / PLOT_FILENAME) if plot_loss(full_log["log"], out / PLOT_FILENAME) else None
            shutil.rmtree(state_dir, ignore_errors=True)
    barrier()
    return summary
