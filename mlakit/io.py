"""Outputs that cannot be lost or half-written: the one atomic writer of mlakit.

Every output (a file or a directory) is written to a temporary sibling
``.NAME.tmp-*``, fsync'ed, and renamed into place. A directory that already
exists is first renamed aside to ``.NAME.old-*`` and removed only once the new one
is in place, so at every instant either the old or the new output is complete.

While a process writes ``NAME`` it holds an exclusive lock (``fcntl.flock``) on the
sibling ``.NAME.lock``: a second writer fails at once with a message instead of
both passing the "exists" check and one deleting the other's result. Holding the
lock also means that no live writer owns the ``.NAME.tmp-*`` / ``.NAME.old-*``
siblings, so they are left by a killed run: they are removed (an old output moved
aside is put back) and reported on stderr.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from mlakit.errors import MlakitError

_held: dict[str, int] = {}  # absolute output path -> nesting depth of output_lock in this process
_held_guard = threading.Lock()


def describe_os_error(error: OSError) -> str:
    return error.strerror or str(error)


def lock_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def _note(message: str) -> None:
    print(f"mlakit: note: {message}", file=sys.stderr)


def _make_parent(path: Path) -> list[Path]:
    """Create ``path``'s missing parents; returns those created (deepest last)."""
    created: list[Path] = []
    parent = path.parent
    missing = []
    while not parent.exists():
        if parent.is_symlink():  # a dangling link
            raise MlakitError(f"cannot write {path}: {parent} is a broken symbolic link")
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise MlakitError(f"cannot write {path}: {parent} is not a directory")
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            if not directory.is_dir():
                raise MlakitError(f"cannot write {path}: {directory} is not a directory") from None
        except OSError as e:
            raise MlakitError(f"cannot write {path}: cannot create {directory}: {describe_os_error(e)}") from None
        created.append(directory)
    return created


def _acquire(lock: Path, path: Path) -> int:
    for _ in range(20):  # a holder that just unlinked the lock file: open the new one
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise MlakitError(f"cannot write {path}: {describe_os_error(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MlakitError(f"{path} is being written by another mlakit process (it holds {lock}); "
                              "wait for it to finish or choose another output") from None
        except OSError as e:
            os.close(fd)
            raise MlakitError(f"cannot lock {lock}: {describe_os_error(e)}") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise MlakitError(f"cannot lock {lock}: it keeps being replaced")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive lock of the output ``path`` (re-entrant within a process).

    Creates missing parent directories (removed again if nothing was written), fails
    fast with a MlakitError when the location cannot be written or another process
    writes there, and recovers what a killed writer left (``recover_stale``)."""
    path = Path(os.path.abspath(path))
    key = str(path)
    with _held_guard:
        nested = key in _held
        if nested:
            _held[key] += 1
    if nested:
        try:
            yield path
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    if path.name in ("", ".", ".."):
        raise MlakitError(f"{path} is not a usable output name")
    created = _make_parent(path)
    lock = lock_file(path)
    try:
        fd = _acquire(lock, path)
    except BaseException:
        _remove_empty(created)
        raise
    with _held_guard:
        _held[key] = 1
    try:
        recover_stale(path)
        yield path
    finally:
        with _held_guard:
            del _held[key]
        with contextlib.suppress(OSError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                os.unlink(lock)  # while still holding it: a waiter re-checks the inode
        os.close(fd)
        if not os.path.lexists(path):
            _remove_empty(created)


def _remove_empty(directories: list[Path]) -> None:
    for directory in reversed(directories):
        with contextlib.suppress(OSError):
            directory.rmdir()


def stale_siblings(path: Path) -> tuple[list[Path], list[Path]]:
    """(``.NAME.tmp-*``, ``.NAME.old-*``) beside ``path``."""
    try:
        names = os.listdir(path.parent)
    except OSError:
        return [], []
    tmp = sorted(path.parent / n for n in names if n.startswith(f".{path.name}.tmp-"))
    old = sorted(path.parent / n for n in names if n.startswith(f".{path.name}.old-"))
    return tmp, old


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover_stale(path: Path) -> list[str]:
    """Clean up after a writer of ``path`` that was killed (call with the lock held):
    an old output moved aside comes back if nothing replaced it; temporaries are
    removed. Returns (and prints) what was done."""
    tmp, old = stale_siblings(path)
    done = []
    if old and not os.path.lexists(path):
        keep = max(old, key=lambda p: p.stat().st_mtime_ns)
        os.rename(keep, path)
        old.remove(keep)
        done.append(f"restored {path} from {keep.name}, left by an interrupted replacement")
    for stale in tmp + old:
        remove_path(stale)
        done.append(f"removed {stale}, left by an interrupted run")
    for message in done:
        _note(message)
    return done


def check_output(path: str | os.PathLike, overwrite: bool, directory: bool) -> Path:
    """MlakitError unless ``path`` may be written: absent, or present with ``overwrite``
    and of the same kind (a directory output never replaces a file, nor the reverse)."""
    path = Path(path)
    if not os.path.lexists(path):
        return path
    if not overwrite:
        raise MlakitError(f"{path} already exists (pass --overwrite to replace it)")
    is_dir = path.is_dir() and not path.is_symlink()
    if is_dir != directory:
        kind = "directory" if is_dir else "file"
        raise MlakitError(f"{path} is a {kind}, but the output is a {'directory' if directory else 'file'}: "
                          "not replacing it; remove it or choose another output")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: Path, directory: bool) -> None:
    """Give a temporary file/dir (created 0600/0700) the permissions of an ordinary one."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for parent, _, files in os.walk(root):
        for name in files:
            _fsync(Path(parent) / name)
        _fsync(Path(parent), directory=True)


@contextlib.contextmanager
def _no_sigint() -> Iterator[None]:
    """SIGINT waits until the block is done (the renames of a commit are not split)."""
    main = threading.current_thread() is threading.main_thread()
    if main:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        if main:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _temporary(path: Path, directory: bool) -> Path:
    try:
        if directory:
            return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
        return Path(name)
    except OSError as e:
        raise MlakitError(f"cannot write {path}: {describe_os_error(e)}") from None


def _commit(tmp: Path, path: Path, directory: bool) -> None:
    publish_mode(tmp, directory)
    _fsync_tree(tmp) if directory else _fsync(tmp)
    aside = None
    with _no_sigint():
        if directory and os.path.lexists(path):
            aside = path.with_name(f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.rename(path, aside)
        try:
            os.replace(tmp, path)
        except BaseException:
            if aside is not None:
                os.rename(aside, path)
            raise
        _fsync(path.parent, directory=True)
    if aside is not None:
        remove_path(aside)  # interrupted here, the next writer removes the rest


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, directory: bool, overwrite: bool = False,
                  lock: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write into; on a clean exit it is
    fsync'ed and renamed to ``path``, on any exception (or interrupt) removed.

    ``lock=False`` is for caches, where two writers of the same content may race:
    the rename keeps it atomic, and the loser's result simply replaces the winner's."""
    path = Path(path)
    guard = output_lock(path) if lock else contextlib.nullcontext()
    with guard:
        check_output(path, overwrite, directory)
        if not lock:
            _make_parent(path)
        tmp = None
        try:
            with _no_sigint():  # an interrupt just after the temporary appears must find it named
                tmp = _temporary(path, directory)
            yield tmp
            _pause_for_tests()
            _commit(tmp, path, directory)
        except OSError as e:  # a full disk, a file system that went read-only, ...
            if tmp is not None:
                remove_path(tmp)
            raise MlakitError(f"cannot write {path}: {describe_os_error(e)}") from None
        except BaseException:
            if tmp is not None:
                remove_path(tmp)
            raise


def _pause_for_tests() -> None:
    """``MLAKIT_TEST_PAUSE_IN_WRITE=S``: sleep S seconds with the output half-written, so that
    the fault tests can interrupt a writer at that point (tests/test_faults.py)."""
    seconds = os.environ.get("MLAKIT_TEST_PAUSE_IN_WRITE")
    if seconds:
        time.sleep(float(seconds))


def atomic_file(path: str | os.PathLike, overwrite: bool = False, lock: bool = True):
    return atomic_output(path, directory=False, overwrite=overwrite, lock=lock)


def atomic_dir(path: str | os.PathLike, overwrite: bool = False, lock: bool = True):
    return atomic_output(path, directory=True, overwrite=overwrite, lock=lock)


def write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True, lock: bool = True) -> Path:
    with atomic_file(path, overwrite=overwrite, lock=lock) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, overwrite: bool = True, lock: bool = True) -> Path:
    return write_bytes(path, text.encode("utf-8"), overwrite=overwrite, lock=lock)


# ------------------------------------------------------------------ scratch space
@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A private temporary directory ``$TMPDIR/mlakit-PREFIX-*``, removed on exit.

    It holds a lock while in use, so the directories of killed runs (whose lock is
    free) are recognised and removed at the next call."""
    root = Path(tempfile.gettempdir())
    stem = f"mlakit-{prefix}-"
    for stale in sorted(root.glob(stem + "*")):
        _remove_if_abandoned(stale)
    try:
        path = Path(tempfile.mkdtemp(prefix=stem, dir=root))
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise MlakitError(f"cannot create a temporary directory in {root}: {describe_os_error(e)}") from None
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def _remove_if_abandoned(path: Path) -> None:
    try:
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        # no lock file: a directory of an older mlakit or one killed before it locked; keep
        # fresh ones (a writer between mkdtemp and locking), drop those older than a day
        with contextlib.suppress(OSError):
            if path.is_dir() and time.time() - path.stat().st_mtime > 86_400:
                shutil.rmtree(path, ignore_errors=True)
        return
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return  # in use
    try:
        shutil.rmtree(path, ignore_errors=True)
        _note(f"removed {path}, left by an interrupted run")
    finally:
        os.close(fd)


# ------------------------------------------------------------------ checks before the work
def ensure_dir(path: str | os.PathLike) -> Path:
    """``path`` as a directory mlakit can write into (created if missing), or a MlakitError."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise MlakitError(f"{path} is not a directory")
    _make_parent(path / "x")
    probe_writable(path)
    return path


def probe_writable(directory: Path) -> None:
    """MlakitError unless a file can be created in ``directory`` (permissions, read-only or
    virtual file systems such as /proc)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".mlakit-probe-", dir=directory)
    except OSError as e:
        raise MlakitError(f"cannot write in {directory}: {describe_os_error(e)}") from None
    os.close(fd)
    os.unlink(name)


# ------------------------------------------------------------------ state without pickle
_MARKERS = ("__tensor__", "__items__", "__tuple__")
TREE_KEY = "mlakit_tree"


def _encode(obj, tensors: dict):
    import torch

    if isinstance(obj, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(m in obj for m in _MARKERS):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot save a {type(obj).__name__} without pickle")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1 and "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if len(obj) == 1 and "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        if len(obj) == 1 and "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def save_tree(obj, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Save nested dicts/lists/tuples of tensors, numbers and strings as ONE safetensors
    file (atomically): the tensors as tensors, the structure as JSON in its metadata.
    Loading it runs no code (no pickle), unlike ``torch.save``."""
    import json

    from safetensors.torch import save_file

    tensors: dict = {}
    skeleton = json.dumps(_encode(obj, tensors))
    with atomic_file(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata={TREE_KEY: skeleton, "producer": "mlakit"})
    return Path(path)


def load_tree(path: str | os.PathLike):
    """What ``save_tree`` saved; MlakitError naming the file when it is not such a file."""
    import json

    from safetensors import safe_open

    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
        return _decode(json.loads(metadata[TREE_KEY]), tensors)
    except OSError as e:
        raise MlakitError(f"cannot read {path}: {describe_os_error(e)}") from None
    except Exception as e:  # SafetensorError, a missing key, bad JSON: a damaged or foreign file
        raise MlakitError(f"{path} is not a readable mlakit state file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else 'damaged'})") from None
