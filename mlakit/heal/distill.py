"""Knowledge distillation of a converted (student) MLA model toward its source (teacher).

Loss per token: ``KL(p_teacher || p_student)`` over the full vocabulary (next-token
distributions), optionally plus per-layer hidden-state matching. Teacher logits are
computed on the fly (no grad; bf16 on CUDA). The vocabulary projection runs in chunks
of positions under activation checkpointing, so the ``[tokens, vocab]`` logits of a whole
batch never sit in memory at once (vocab 49152 x 8192 tokens would be 1.6 GB per copy).

Everything a step does is a pure function of (seed, step): which windows it reads,
which elastic rank it samples. A resumed run therefore repeats an uninterrupted one
bit for bit (the state holds parameters, optimizer moments and the log).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mlakit.attention import MLA_PARAMETERS
from mlakit.errors import MlakitError
from mlakit.model import BlockFn, Transformer
from mlakit.options import DEFAULT, ForwardOptions
from mlakit.speed import compiled_block_call

TRAIN_SETS = ("mla", "attention", "all")
# "all": 1e-4 gave ppl 37.43 from 14.4M tokens where 5e-5 gave 38.06 from 18.6M (75% saving,
# H200, docs/heal.md); the whole model moving needs a smaller step than the attention alone.
DEFAULT_LR = {"mla": 3e-4, "attention": 3e-4, "all": 1e-4}
STATE_FILENAME = "state.safetensors"  # tensors + JSON, no pickle (mlakit.io.save_tree)
LEGACY_STATE_FILENAME = "state.pt"  # older runs: a pickle, refused
HELD_OUT_EVERY = 10  # at most one window in this many is held out for the held-out KL


@dataclass
class HealOptions:
    tokens: int = 10_000_000  # training tokens (steps x batch_size x seq_len)
    train: str = "attention"  # mla | attention | all: which parameters move
    lr: float | None = None  # None: DEFAULT_LR[train]
    min_lr_ratio: float = 0.1  # the cosine ends at lr x this
    warmup: float = 0.03  # fraction of the steps with a linear warm-up
    batch_size: int = 16  # windows per step
    seq_len: int = 512
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    hidden_weight: float = 0.0  # weight of per-layer hidden-state matching (0: KL only)
    kl_chunk: int = 4096  # positions per chunk of the vocabulary projection
    gradient_checkpointing: bool = False
    layerwise_steps: int = 0  # > 0: layer-wise initialisation with this many steps per layer first
    layerwise_lr: float = 1e-4  # 1e-3 made 9 of 30 layers of the default model worse (docs/heal.md)
    layerwise_windows: int = 32
    elastic_ranks: list[int] | None = None  # sample one latent rank per step among these
    elastic_min_fraction: float | None = None  # ... or among [ceil(f r_max), r_max]
    elastic_full_share: float = 0.5  # share of the steps at the full (largest) rank; the rest uniform below it
    checkpoint_every: int = 200  # steps between checkpoints (and validations)
    val_windows: int = 16  # held-out windows (the last ones of the data; at most one in HELD_OUT_EVERY)
    shift_windows: bool = False  # repeated epochs cut the text into windows at other offsets
    max_minutes: float | None = None  # stop (saving the state) after this much wall time
    seed: int = 0
    autocast: bool | None = None  # bf16 autocast; None: on CUDA only
    compile: bool = False  # torch.compile every transformer block (regional) and the KL of a chunk
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager" in CPU tests)
    progress: bool = True
    # train through the cache the model will run with (mlakit.quant): the student attends over
    # its latent as that cache stores it, gradients passed straight through the rounding
    kv_cache_dtype: str | None = None

    # options that do not change the math: a resumed run may set them differently (compiling
    # may round differently, so only runs with the same compile setting are bit for bit equal)
    RUNTIME_ONLY = ("checkpoint_every", "max_minutes", "progress", "compile", "compile_backend")

    def check(self) -> None:
        if self.train not in TRAIN_SETS:
            raise MlakitError(f"--train must be one of {TRAIN_SETS}, got {self.train!r}")
        for name in ("tokens", "batch_size", "seq_len", "kl_chunk", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise MlakitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.tokens < self.batch_size * self.seq_len:
            raise MlakitError(f"--tokens {self.tokens} is less than one step ({self.batch_size} x {self.seq_len})")
        if not 0 <= self.warmup < 1:
            raise MlakitError(f"--warmup must be in [0, 1), got {self.warmup}")
        if self.learning_rate <= 0:
            raise MlakitError(f"--lr must be positive, got {self.learning_rate}")
        if self.layerwise_steps < 0:
            raise MlakitError("--layerwise-init steps must be >= 0")
        if not 0 <= self.elastic_full_share <= 1:
            raise MlakitError(f"--elastic-full-share must be in [0, 1], got {self.elastic_full_share}")
        if self.kv_cache_dtype is not None:
            from mlakit.quant import cache_format, split_cache_choice

            cache_format(split_cache_choice(self.kv_cache_dtype)[0])

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.train] if self.lr is None else self.lr

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / (self.batch_size * self.seq_len))

    def training_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in self.RUNTIME_ONLY}


@dataclass
class HealResult:
    finished: bool
    step: int
    steps: int
    log: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ parameters
def trainable_names(model: Transformer, train: str) -> list[str]:
    """Names of the parameters ``train`` moves: ``mla`` the MLA projections and norms
    inside attention, ``attention`` also ``wo``, ``all`` everything."""
    if train not in TRAIN_SETS:
        raise MlakitError(f"--train must be one of {TRAIN_SETS}, got {train!r}")
    names = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        in_attention = len(parts) > 3 and parts[0] == "layers" and parts[2] == "attention"
        if train == "all" or (in_attention and (parts[3] in MLA_PARAMETERS or (train == "attention"
                                                                                and parts[3] == "wo"))):
            names.append(name)
    return names


def select_trainable(model: Transformer, train: str) -> list[torch.nn.Parameter]:
    names = set(trainable_names(model, train))
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
        if name in names:
            params.append(param)
    return params


# ------------------------------------------------------------------ forward + loss
def forward_hidden(model: Transformer, tokens: torch.Tensor, grad_checkpoint: bool = False,
                   collect: bool = False, block_fn: BlockFn | None = None,
                   options: ForwardOptions = DEFAULT) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Final normed hidden states ``[b, s, dim]`` of ``tokens [b, s]`` (each window from
    position 0, as ``model(tokens, options=options)`` computes them), and each block's output
    when ``collect``. ``block_fn``: a compiled block call (``mlakit.speed.compiled_block_call``)."""
    hidden: list[torch.Tensor] = []
    x = model.hidden_states(tokens, options, block_fn=block_fn, grad_checkpoint=grad_checkpoint,
                            collect=hidden if collect else None)
    return x, hidden


def kl_sum(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """Summed ``KL(p_t || p_s)`` of logits ``[n, vocab]`` (softmax in float32, or float64 for
    float64 models); no gradient flows to ``t_logits``. Elementwise and reductions only: under
    ``torch.compile`` it fuses into a few passes over the logits."""
    wide = torch.float64 if s_logits.dtype == torch.float64 else torch.float32
    s_logp = F.log_softmax(s_logits.to(wide), dim=-1)
    t_logp = F.log_softmax(t_logits.detach().to(wide), dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum()


def _kl_chunk(student: Transformer, teacher: Transformer, hs: torch.Tensor, ht: torch.Tensor,
              kl_fn=kl_sum) -> torch.Tensor:
    """Summed ``KL(p_t || p_s)`` over the positions of ``hs, ht [n, dim]``."""
    s_logits = student.head(hs)  # [n, vocab]
    with torch.no_grad():
        t_logits = teacher.head(ht)
    return kl_fn(s_logits, t_logits)


def kl_loss(student: Transformer, teacher: Transformer, hs: torch.Tensor, ht: torch.Tensor,
            chunk: int, kl_fn=kl_sum) -> torch.Tensor:
    """Mean per-token KL of the student's next-token distributions from the teacher's
    (``kl_fn``: ``kl_sum`` or a compiled ``kl_sum``)."""
    hs, ht = hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1])
    total = 0.0
    for i in range(0, hs.shape[0], chunk):
        if torch.is_grad_enabled():  # the chunk's logits are recomputed in backward, never all kept
            total = total + checkpoint(_kl_chunk, student, teacher, hs[i:i + chunk], ht[i:i + chunk], kl_fn,
                                       use_reentrant=False)
        else:
            total = total + _kl_chunk(student, teacher, hs[i:i + chunk], ht[i:i + chunk], kl_fn)
    return total / hs.shape[0]


def hidden_loss(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor],
                reduce_mean=None) -> torch.Tensor:
    """Mean over layers of ``‖h_s − h_t‖² / ‖h_t‖²`` (scale-free: deep layers have larger states).
    ``reduce_mean`` (several processes): the mean over ranks of a tensor, so that the scale
    ``‖h_t‖²`` is the whole batch's and the ranks' losses average to the one-process loss."""
    def scale(t: torch.Tensor) -> torch.Tensor:
        mean = t.float().pow(2).mean()
        return (mean if reduce_mean is None else reduce_mean(mean)).clamp(min=1e-12)

    losses = [(s.float() - t.float()).pow(2).mean() / scale(t) for s, t in zip(student_hidden, teacher_hidden)]
    return torch.stack(losses).mean()


class Distiller:
    """Loss of one batch; owns the autocast setting."""

    def __init__(self, student: Transformer, teacher: Transformer, options: HealOptions) -> None:
        self.student, self.teacher, self.options = student, teacher, options
        device = student.device
        use_amp = device.type == "cuda" if options.autocast is None else options.autocast
        self.amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp)
        self.kl_fn = kl_sum
        self.block_fn: BlockFn | None = None
        self.student_options = ForwardOptions.for_cache(options.kv_cache_dtype)  # the teacher runs as it is
        self.reduce_mean = None  # several processes: the mean over ranks (hidden_loss's scale)

    def compile(self) -> None:
        """Run the blocks of both models and the KL of a chunk through ``torch.compile``
        (``options.compile_backend``): regional compilation, fixed window shapes."""
        backend = self.options.compile_backend
        self.block_fn = compiled_block_call(backend, dynamic=None)
        self.kl_fn = torch.compile(kl_sum, backend=backend)

    def uncompile(self) -> None:
        self.block_fn, self.kl_fn = None, kl_sum

    def loss(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss, KL) of ``tokens [b, s]``."""
        opts = self.options
        collect = opts.hidden_weight > 0
        with torch.autocast(**self.amp):
            with torch.no_grad():
                ht, ht_layers = forward_hidden(self.teacher, tokens, collect=collect, block_fn=self.block_fn)
            hs, hs_layers = forward_hidden(self.student, tokens, opts.gradient_checkpointing, collect, self.block_fn,
                                           self.student_options)
            kl = kl_loss(self.student, self.teacher, hs, ht, opts.kl_chunk, self.kl_fn)
            total = (kl + opts.hidden_weight * hidden_loss(hs_layers, ht_layers, self.reduce_mean) if collect
                     else kl)
        return total, kl.detach()

    @torch.no_grad()
    def validate(self, windows: torch.Tensor) -> float:
        """Mean per-token KL over ``windows [n, s]``."""
        if windows.shape[0] == 0:
            return float("nan")
        total, n = 0.0, 0
        for i in range(0, windows.shape[0], self.options.batch_size):
            batch = windows[i:i + self.options.batch_size].to(self.student.device)
            with torch.autocast(**self.amp):
                hs, _ = forward_hidden(self.student, batch, block_fn=self.block_fn, options=self.student_options)
                ht, _ = forward_hidden(self.teacher, batch, block_fn=self.block_fn)
                total += float(kl_loss(self.student, self.teacher, hs, ht, self.options.kl_chunk,
                                       self.kl_fn)) * batch.numel()
            n += batch.numel()
        return total / n


# ------------------------------------------------------------------ schedule + data order
def learning_rate(options: HealOptions, step: int) -> float:
    """Linear warm-up, then cosine from ``lr`` down to ``lr x min_lr_ratio``."""
    steps, peak = options.steps, options.learning_rate
    warm = max(1, round(options.warmup * steps)) if options.warmup > 0 else 0
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    floor = peak * options.min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class BatchOrder:
    """Windows of each step: epoch after epoch, each a fixed shuffle of (seed, epoch).

    With ``shift``, epoch e cuts the training text (its windows end to end, wrapping
    around) at an offset of ``frac(e x 0.618) x seq_len`` tokens (0, 316, 120, 437, ...
    for 512): a repeated epoch reads the same text in other windows, so each token is
    predicted from another context and at another position."""

    def __init__(self, windows: torch.Tensor, batch_size: int, seed: int, shift: bool = False) -> None:
        self.n, self.seq_len = windows.shape
        self.flat = windows.reshape(-1)
        self.batch_size, self.seed, self.shift = batch_size, seed, shift
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(
                self.seed * 104_729 + epoch))}
        return self._perms[epoch]

    def offset(self, epoch: int) -> int:
        return int((epoch * 0.6180339887498949) % 1.0 * self.seq_len) if self.shift else 0

    def batch(self, step: int) -> torch.Tensor:
        """The step's windows ``[batch_size, seq_len]``."""
        flat = range(step * self.batch_size, (step + 1) * self.batch_size)
        starts = torch.stack([self._perm(p // self.n)[p % self.n] * self.seq_len + self.offset(p // self.n)
                              for p in flat])  # [b]
        index = (starts[:, None] + torch.arange(self.seq_len)) % self.flat.numel()  # [b, s]
        return self.flat[index]


# ------------------------------------------------------------------ state
def _atomic_save(obj: Any, path: Path) -> None:
    from mlakit.io import save_tree

    save_tree(obj, path)  # safetensors + JSON: a state file never runs code when loaded


def data_fingerprint(windows: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(windows.to(torch.int32).numpy().tobytes()).hexdigest()[:16]


def load_state(state_dir: Path) -> dict[str, Any] | None:
    from mlakit.io import load_tree

    path = Path(state_dir) / STATE_FILENAME
    if not path.exists():
        if (Path(state_dir) / LEGACY_STATE_FILENAME).exists():
            raise MlakitError(f"{Path(state_dir) / LEGACY_STATE_FILENAME} is a pickle from an older mlakit and is "
                              "not loaded (a pickle can run code); start over with --overwrite")
        return None
    state = load_tree(path)
    if not isinstance(state, dict) or not {"step", "params", "optimizer", "log", "options", "data"} <= set(state):
        raise MlakitError(f"{path} is not a heal state (fields missing); start over with --overwrite")
    return state


def _check_resumable(state: dict[str, Any], options: HealOptions, data: str) -> None:
    saved = state["options"]
    # an option newer than the saved run counts as its default (what that run did)
    defaults = HealOptions().training_dict()
    changed = sorted(k for k, v in options.training_dict().items() if saved.get(k, defaults.get(k)) != v)
    if changed:
        raise MlakitError(f"--resume with different settings than the saved run ({', '.join(changed)}); "
                          "use the same options, or --overwrite to start over")
    if state["data"] != data:
        raise MlakitError("--resume with different training data than the saved run; use --overwrite to start over")


# ------------------------------------------------------------------ training
def _quiet(*args, **kwargs) -> None:
    """The log of ranks other than 0."""
def _split_windows(student: Transformer, teacher: Transformer, windows: torch.Tensor,
                   options: HealOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(all windows at ``options.seq_len``, training windows, held-out windows) after checking
    that the two models can be distilled."""
    if not student.config.is_mla:
        raise MlakitError("the model to heal must be an MLA model (the converted one); the teacher is the original")
    if student.config.vocab_size != teacher.config.vocab_size:
        raise MlakitError(f"student and teacher vocabularies differ ({student.config.vocab_size} vs "
                          f"{teacher.config.vocab_size})")
    if windows.shape[1] != options.seq_len:
        windows = windows.reshape(-1)[: windows.numel() // options.seq_len * options.seq_len].view(-1, options.seq_len)
    n_val = min(options.val_windows, windows.shape[0] // HELD_OUT_EVERY)
    train_windows, val_windows = windows[: windows.shape[0] - n_val], windows[windows.shape[0] - n_val:]
    if train_windows.shape[0] == 0:
        raise MlakitError("no training windows")
    return windows, train_windows, val_windows


def _first_validation(distiller: "Distiller", train_windows: torch.Tensor, val_windows: torch.Tensor,
                      history: dict[str, Any], log) -> None:
    """A fresh run's start: the held-out KL of the converted model, the layer-wise fit if asked
    for, and the held-out KL at step 0."""
    options, student, teacher = distiller.options, distiller.student, distiller.teacher
    history["kl_before"] = distiller.validate(val_windows)  # the converted model as it came
    if options.layerwise_steps > 0:
        from mlakit.heal.layerwise import layerwise_init

        history["layerwise"] = layerwise_init(student, teacher, train_windows, options, log=log)
        student.train()
        select_trainable(student, options.train)
    history["val"].append({"step": 0, "tokens": 0, "kl": distiller.validate(val_windows)
                           if options.layerwise_steps > 0 else history["kl_before"]})


def _train_step(distiller: "Distiller", optimizer, params, batch: torch.Tensor, ranks,
                grad_clip: float) -> tuple[float, torch.Tensor]:
    """One optimizer step on this rank's ``batch``; (loss, KL) of the global batch."""
    loss, kl = distiller.loss(batch)
    loss.backward()
    if grad_clip > 0:
        ranks.clip(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss, kl = ranks.mean(loss.detach()), ranks.mean(kl)  # the global batch's (what one process logs)
    return float(loss), kl


def _save_state(state_dir: Path, step: int, student, optimizer, names, history, options: HealOptions,
                data_id: str, ranks) -> None:
    params_state = ranks.parameters_state(student, names)  # every rank takes part in the gathers
    optimizer_state = ranks.optimizer_state(student, optimizer, names)
    if ranks.is_main:
        _atomic_save({"step": step, "params": params_state, "optimizer": optimizer_state, "log": history,
                      "options": options.training_dict(), "data": data_id}, state_dir / STATE_FILENAME)


def _record(history: dict[str, Any], bar, speed: float, **values) -> None:
    """One step's figures into the log and the progress bar."""
    for key, value in values.items():
        history.setdefault(key, []).append(value)
    rank = values["rank"]
    bar.update(1)
    bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{speed:,.0f}", **({"rank": rank} if rank else {}))


def heal_model(student: Transformer, teacher: Transformer, windows: torch.Tensor, options: HealOptions,
               state_dir: str | os.PathLike | None = None, resume: bool = False, log=print,
               job=None) -> HealResult:
    """Distil ``student`` toward ``teacher`` on ``windows [n, seq_len]`` (in place).

    With ``state_dir``, the state is saved every ``checkpoint_every`` steps and when
    ``max_minutes`` runs out (then ``finished`` is False: call again with ``resume``).
    ``job`` (``mlakit.parallel.init()``, several processes): both models are sharded with
    FSDP2 and each rank trains on its share of every batch (``mlakit.heal.sharded``); every
    rank passes the same windows; only rank 0 logs and writes the state."""
    from mlakit.heal.elastic import elastic_choices
    from mlakit.heal.sharded import Ranks

    options.check()
    ranks = Ranks(job)
    ranks.check(options)
    if not ranks.is_main:
        log = _quiet
    run_start = time.perf_counter()
    windows, train_windows, val_windows = _split_windows(student, teacher, windows, options)
    choices = elastic_choices(student, options.elastic_ranks, options.elastic_min_fraction)
    teacher.eval().requires_grad_(False)
    student.train()  # trained on the naive path (the default options)
    select_trainable(student, options.train)
    names = trainable_names(student, options.train)
    params = ranks.shard(student, teacher, names)
    data_id = data_fingerprint(windows)
    state_dir = Path(state_dir) if state_dir is not None else None
    state = load_state(state_dir) if (state_dir is not None and resume) else None
    history: dict[str, Any] = {"options": asdict(options), "steps": options.steps, "step": [], "tokens": [],
                               "loss": [], "kl": [], "lr": [], "rank": [], "step_seconds": [], "val": [],
                               "layerwise": None,
                               "train_windows": train_windows.shape[0], "val_windows": val_windows.shape[0],
                               "wall_seconds": 0.0, "trainable_parameters": sum(p.numel() for p in params)}
    distiller = Distiller(student, teacher, options)
    if job is not None:
        distiller.reduce_mean = ranks.mean
    if state is not None:
        _check_resumable(state, options, data_id)
        ranks.load(student, state["params"])
        history = state["log"]
        step = state["step"]
        log(f"resuming at step {step}/{options.steps}")
    else:
        step = 0
        _first_validation(distiller, train_windows, val_windows, history, log)

    optimizer = torch.optim.AdamW(params, lr=options.learning_rate, betas=(0.9, 0.95),
                                  weight_decay=options.weight_decay, fused=(student.device.type == "cuda") or None)
    if state is not None:
        ranks.load_optimizer(student, optimizer, state["optimizer"], names)
    loop = _TrainingLoop(distiller, optimizer, params, names, ranks, history, state_dir, data_id, val_windows,
                         run_start)
    if state is None:
        loop.save(0)  # layer-wise initialisation (if any) is not repeated by a resume
    order = BatchOrder(train_windows, options.batch_size, options.seed, shift=options.shift_windows)
    return loop.run(step, order, choices, log)


class _TrainingLoop:
    """The steps of one ``heal_model`` call after its start (or resume): this rank's
    parameters and their optimizer, the log, the held-out windows, where the state goes."""

    def __init__(self, distiller: Distiller, optimizer, params, names, ranks, history: dict[str, Any],
                 state_dir: Path | None, data_id: str, val_windows: torch.Tensor, run_start: float) -> None:
        self.distiller, self.optimizer, self.params, self.names, self.ranks = distiller, optimizer, params, names, ranks
        self.options, self.student = distiller.options, distiller.student
        self.history, self.state_dir, self.data_id, self.val_windows = history, state_dir, data_id, val_windows
        self.run_start = self.segment_start = run_start

    def save(self, step: int) -> None:
        if self.state_dir is not None:
            _save_state(self.state_dir, step, self.student, self.optimizer, self.names, self.history, self.options,
                        self.data_id, self.ranks)

    def run(self, step: int, order: BatchOrder, choices, log) -> HealResult:
        """Steps from ``step`` to the last, or until ``max_minutes`` (then not ``finished``)."""
        from tqdm.auto import tqdm

        from mlakit.heal.elastic import LatentMask, sample_rank

        options, history = self.options, self.history
        mask = LatentMask(self.student) if choices else None
        if options.compile:  # after the layer-wise phase and the first validation, which stay eager
            self.distiller.compile()
        tokens_per_step = options.batch_size * options.seq_len
        bar = tqdm(total=options.steps, initial=step, desc="heal", unit="step",
                   disable=not (options.progress and self.ranks.is_main))
        finished = True
        speed = None
        first_step, loop_start = step, time.perf_counter()
        try:
            while step < options.steps:
                t0 = time.perf_counter()
                lr = learning_rate(options, step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                rank = None
                if mask is not None:
                    rank = mask.rank = sample_rank(choices, options.seed, step, options.elastic_full_share)
                batch = self.ranks.share(order.batch(step)).to(self.student.device)  # this rank's share of the batch
                loss_value, kl = _train_step(self.distiller, self.optimizer, self.params, batch, self.ranks,
                                             options.grad_clip)
                step += 1
                dt = time.perf_counter() - t0
                speed = tokens_per_step / dt if speed is None else 0.9 * speed + 0.1 * tokens_per_step / dt
                _record(history, bar, step=step, tokens=step * tokens_per_step, loss=loss_value, kl=float(kl), lr=lr,
                        rank=rank, step_seconds=round(dt, 5), speed=speed)
                if not math.isfinite(loss_value):
                    raise MlakitError(f"the loss is not finite at step {step} (lower --lr?)")
                if not self._after_step(step, mask, tokens_per_step):
                    finished = False
                    log(f"\nstopped at step {step}/{options.steps}: the time limit ran out ({options.max_minutes:.1f} "
                        "minutes were left for training); run again with --resume to continue")
                    break
        finally:
            bar.close()
            if mask is not None:
                mask.remove()
            if options.compile:
                self.distiller.uncompile()
            self.student.eval().requires_grad_(False)
        history["tokens_per_second"] = speed  # a moving average of the last steps' speed
        # this call's steps over its whole loop: compilation and held-out evaluations included
        history["tokens_per_second_overall"] = (step - first_step) * tokens_per_step / max(1e-9, time.perf_counter()
                                                                                             - loop_start)
        return HealResult(finished=finished, step=step, steps=options.steps, log=history)

    def _after_step(self, step: int, mask, tokens_per_step: int) -> bool:
        """The held-out KL and the state at each checkpoint, the last step and when the time is
        out; False: out of time before the last step (stop here)."""
        options = self.options
        last = step == options.steps
        out_of_time = (options.max_minutes is not None
                       and time.perf_counter() - self.run_start > 60 * options.max_minutes)
        if step % options.checkpoint_every == 0 or last or out_of_time:
            if mask is not None:
                mask.rank = None  # validate at the full rank
            self.history["val"].append({"step": step, "tokens": step * tokens_per_step,
                                        "kl": self.distiller.validate(self.val_windows)})
            self.history["wall_seconds"] += time.perf_counter() - self.segment_start
            self.segment_start = time.perf_counter()
            self.save(step)
        return not (out_of_time and not last)
