"""The output folder of a Timber merge: the new model lands there whole, or not at all.

Where: the output path is resolved (symlinks followed) and the merge is written into a
hidden staging folder INSIDE the resolved folder, ``OUT/.timber-staging-<pid>-<hex>/model``.
Staging and output share one filesystem, so publishing is a few renames in one
directory (no copy of the weights), and the output folder itself is never removed or
replaced: a symlink, a mount point, ``.``, a folder with its own mode, owner, setgid
group or ACLs stays what it is. The short staging name also works under an output
name of 250 characters.

What: publishing replaces exactly the files a mergekit model output consists of
(`previous_model_files`: weights as mergekit and transformers name them, their index, the
config, generation config, tokenizer and chat-template files, the card and
``mergekit_config.yml``) plus the shards the previous output's own index lists. Any
other file or folder (``*.gguf``, ``*.pt``, ``training_args.bin``, notes, sub-folders)
is never deleted or moved. A re-run into the same folder works as with mergekit, and
leaves no stale shard of the previous model behind.

Order (one publisher at a time per folder: a lock on the folder): the previous
``config.json`` is taken away first, then the new weights and index move in, then the
previous model's files the new one lacks are taken away, then the other new files, and
``config.json`` last. Every step is a rename (the previous model's files are moved into
the staging folder and deleted with it, after publishing). A reader sees the previous
model whole, or no ``config.json`` (for the time of the renames), or the new model
whole: never a mixed one.

Leftovers: the staging folder holds a lock (``flock``) for its merge's lifetime. A
staging folder whose lock is free was left by a merge that was killed (SIGKILL, a
power cut); the next merge into the same output removes it, with one log line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Iterable, List, Optional, Set

from mergekit_timber.checkpoint import INDEX_FILES, MODEL_FILES, MODEL_FOLDERS, WEIGHT_SUFFIXES, is_weight_file
from mergekit_timber.integration import signals
from mergekit_timber.errors import TimberOutputError

try:
    import fcntl
except ImportError:  # not POSIX: staging folders are judged by the owner written in them
    fcntl = None

LOG = logging.getLogger(__name__)

STAGING_PREFIX = ".timber-staging-"
_STAGING_NAME = re.compile(r"^\.timber-staging-(\d+)-[0-9a-f]+$")
_MODEL_SUBDIR = "model"  # what mergekit writes into, inside the staging folder
_LOCK_FILE = "lock"
_REPLACED = "replaced"  # sub-folders of the previous model, moved aside while publishing
# The longest path the merge adds below the output folder (staging name, model/,
# a shard name): checked against the filesystem's limit before any work.
_STAGING_RESERVE = len(f"/{STAGING_PREFIX}4294967295-{'f' * 8}/{_MODEL_SUBDIR}/") + 64

CARD = "README.md"
_CARD_MARK = "created using [mergekit]"
# Never a model shard, whatever an index says: training state kept beside a model.
_NEVER = frozenset(("training_args.bin", "optimizer.bin", "scheduler.bin", "scaler.bin"))

# errno values of a failed write: the message names the file written, not the one read.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}


def display(path) -> str:
    """`path` as the user knows it: a file being staged is shown at its place in the output."""
    text = os.fspath(path)
    return re.sub(rf"/\.timber-staging-\d+-[0-9a-f]+/{_MODEL_SUBDIR}(?=/|$)", "", text)


def describe(error: BaseException, written: Optional[Path] = None) -> str:
    """The cause of a failure in one line; for a failed write, the file written (not the
    one read), or the full disk of `written`, the folder being written."""
    if isinstance(error, OSError) and error.strerror:
        name = error.filename2 if error.errno in _WRITE_ERRNOS and error.filename2 else error.filename
        return f"{error.strerror}: {display(name)}" if name else error.strerror
    text = str(error)
    code = re.search(r"Os \{ code: (\d+)|\(os error (\d+)\)", text)  # safetensors' Rust io::Error
    if code:
        return os.strerror(int(code.group(1) or code.group(2)))
    if written is not None and _torch_write_error(error) and _nearly_full(written):
        return os.strerror(errno.ENOSPC)  # torch.save says only "unexpected pos ..."
    first = (text.strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def is_write_failure(error: BaseException) -> bool:
    """An error raised while writing files: OSError, safetensors' SafetensorError (not an
    OSError), torch.save's RuntimeError (--no-safe-serialization)."""
    return isinstance(error, OSError) or type(error).__name__ == "SafetensorError" or _torch_write_error(error)


@contextlib.contextmanager
def writing_into(folder: Path):
    """A failed write into `folder` (disk full, read-only: any `is_write_failure`) as one
    line naming the folder as the user knows it and the file written; other errors pass."""
    try:
        yield
    except Exception as error:
        if not is_write_failure(error):  # disk full is a SafetensorError, not an OSError
            raise
        cause = _over_file_size_limit(error, folder) or describe(error, written=folder)
        raise TimberOutputError(f"writing the merged model into {display(folder)} failed: {cause}") from error


def _torch_write_error(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text)


def _over_file_size_limit(error: BaseException, folder: Path) -> Optional[str]:
    """The cause when a write hit the process's file-size limit (`ulimit -f`): safetensors
    says "File too large" (EFBIG), torch.save only "unexpected pos ..."; else None."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    too_large = getattr(error, "errno", None) == errno.EFBIG or os.strerror(errno.EFBIG) in str(error)
    if limit == resource.RLIM_INFINITY or not (too_large or _torch_write_error(error)):
        return None
    try:
        files = sorted((f.stat().st_size, f.name) for f in Path(folder).iterdir() if f.is_file())
    except OSError:
        files = []
    if not too_large and (not files or files[-1][0] < limit):
        return None  # not the limit: torch's message for a full disk, say
    shard = files[-1][1] if files and files[-1][0] >= limit else "a weight shard"  # safetensors drops its file
    return (
        f"{shard} reached this process's file-size limit of {limit} bytes (ulimit -f); "
        "raise it (ulimit -f unlimited) or write smaller shards (--out-shard-size below the limit)"
    )


def _nearly_full(folder: Path) -> bool:
    try:
        stat = os.statvfs(folder)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < (16 << 20)


class OutputDir:
    """One output folder: checked before work, staged inside itself, published at the end."""

    def __init__(self, path, *, inputs: Iterable = ()):
        self.requested = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
        self.path = Path(os.path.realpath(self.requested))
        self.inputs = [Path(p) for p in inputs]
        self._created: List[Path] = []  # folders this merge made (removed again if it fails)
        self._staging: Optional[Path] = None
        self._lock_fd: Optional[int] = None

    @property
    def name(self) -> str:
        """The model's name for its card: the output folder's name as the user wrote it."""
        return self.requested.name or self.path.name

    @property
    def label(self) -> str:
        if self.requested == self.path:
            return str(self.path)
        return f"{self.requested} (-> {self.path})"

    @property
    def model_dir(self) -> Path:
        """Where the merge is written (exists after `open`)."""
        assert self._staging is not None, "open() first"
        return self._staging / _MODEL_SUBDIR

    # ----------------------------------------------------------------- before work

    def check(self) -> None:
        """Refuse, in one line and touching nothing, what the merge could not publish."""
        existing = _nearest_existing(self.path)
        if existing == self.path and not existing.is_dir():
            raise TimberOutputError(f"output {self.label} exists and is not a directory")
        if not existing.is_dir():
            raise TimberOutputError(f"output {self.label}: {existing} is not a directory")
        name_max = _pathconf(existing, "PC_NAME_MAX", 255)
        for part in self.path.parts:
            if len(os.fsencode(part)) > name_max:
                raise TimberOutputError(
                    f"output {self.label}: the name {part[:40]}... is {len(os.fsencode(part))} bytes long; "
                    f"this filesystem allows {name_max}"
                )
        path_max = _pathconf(existing, "PC_PATH_MAX", 4096)
        if len(os.fsencode(str(self.path))) + _STAGING_RESERVE >= path_max:
            raise TimberOutputError(
                f"output {self.label}: the path is {len(os.fsencode(str(self.path)))} bytes long; the model's "
                f"files would exceed this filesystem's limit of {path_max}: choose a shorter path"
            )
        if not os.access(existing, os.W_OK | os.X_OK):
            cause = "read-only file system" if _read_only(existing) else "permission denied"
            raise TimberOutputError(f"output {self.label}: cannot write into {existing}: {cause}")
        for model in self.inputs:
            if existing == self.path and model.is_dir() and os.path.samefile(model, self.path):
                raise TimberOutputError(f"output {self.label} is an input model's directory; choose another")

    def open(self) -> Path:
        """Create the output folder if needed and a fresh staging folder inside it; remove
        staging folders that killed merges left there. Returns where to write the model."""
        try:
            missing = []
            folder = self.path
            while not folder.exists():
                missing.append(folder)
                folder = folder.parent
            for folder in reversed(missing):
                with contextlib.suppress(FileExistsError):  # a concurrent merge made it
                    os.mkdir(folder)
                    self._created.append(folder)
            self.remove_leftovers()
            while True:
                staging = self.path / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
                try:
                    os.mkdir(staging)
                    break
                except FileExistsError:
                    continue
            self._staging = staging
            self._lock_fd = _hold_lock(staging / _LOCK_FILE)
            os.mkdir(staging / _MODEL_SUBDIR)
        except OSError as error:
            self.discard()
            raise TimberOutputError(f"output {self.label}: cannot write there: {describe(error)}") from error
        return self.model_dir

    def remove_leftovers(self) -> None:
        """Remove the staging folders in the output that no running merge holds."""
        try:
            entries = list(os.scandir(self.path))
        except OSError:
            return
        for entry in entries:
            match = _STAGING_NAME.match(entry.name)
            if not match or not entry.is_dir(follow_symlinks=False) or Path(entry.path) == self._staging:
                continue
            owner = _owner_if_alive(Path(entry.path), int(match.group(1)))
            if owner is None:
                shutil.rmtree(entry.path, ignore_errors=True)
                LOG.warning("removed %s: left by a Timber merge that was stopped before it finished", entry.path)

    # ----------------------------------------------------------------- publishing

    def publish(self) -> None:
        """Move the finished model from staging into the output, `config.json` last.

        SIGTERM/SIGHUP (and Ctrl-C) wait until the renames are done: a publish is never
        left halfway by a signal we handle.
        """
        new = self.model_dir
        started = time.perf_counter()
        with signals.deferred(), _folder_lock(self.path):
            if not self.path.is_dir() or not self._staging.is_dir():
                raise TimberOutputError(f"output {self.label} was removed while the merge ran")
            incoming = sorted(os.listdir(new))
            previous = self.previous_model_files()
            for name in incoming + ["config.json"]:  # before the first rename: nothing changed yet
                if name not in MODEL_FOLDERS and (self.path / name).is_dir() and not (self.path / name).is_symlink():
                    raise TimberOutputError(
                        f"output {self.label}: {name} there is a folder; the model's file of that name cannot replace it"
                    )
            try:
                self._take_away("config.json")  # first: the previous model stops loading
                for name in incoming:
                    if is_weight_file(name):
                        self._move_in(name)
                for name in sorted(previous - set(incoming)):
                    self._take_away(name)  # stale shards, the other format, files the new one lacks
                for name in incoming:
                    if not is_weight_file(name) and name != "config.json":
                        self._move_in(name)
                if "config.json" in incoming:
                    self._move_in("config.json")  # last: now the folder loads as the new model
            except OSError as error:
                raise TimberOutputError(
                    f"publishing the merged model in {self.label} failed: {describe(error)}"
                ) from error
        took = time.perf_counter() - started
        self._created.clear()  # the output is the user's model now
        self.discard()
        LOG.info("published %d files in %s by rename in %.1f ms", len(incoming), self.label, took * 1000)

    def previous_model_files(self) -> Set[str]:
        """Names in the output folder that belong to a model output (see module doc)."""
        names: Set[str] = set()
        for entry in os.scandir(self.path):
            is_dir = entry.is_dir(follow_symlinks=False)
            if (is_dir and entry.name in MODEL_FOLDERS) or (not is_dir and entry.name in MODEL_FILES):
                names.add(entry.name)
            elif not is_dir and is_weight_file(entry.name):
                names.add(entry.name)
            elif not is_dir and entry.name == CARD and _is_mergekit_card(Path(entry.path)):
                names.add(entry.name)
        for index in INDEX_FILES:
            names |= _listed_shards(self.path, index)
        return names

    def _take_away(self, name: str) -> None:
        """Move a previous model's file aside, into the staging folder: a rename (deleting
        gigabytes can take a while; it happens with the staging folder, after publishing)."""
        item = self.path / name
        if item.exists() or item.is_symlink():
            aside = self._staging / _REPLACED
            aside.mkdir(exist_ok=True)
            os.rename(item, aside / name)

    def _move_in(self, name: str) -> None:
        self._take_away(name)
        os.rename(self.model_dir / name, self.path / name)

    # ----------------------------------------------------------------- the end

    def discard(self) -> None:
        """Remove the staging folder (and folders this merge created, if still empty)."""
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        for folder in reversed(self._created):
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only if empty: never anything a user put there meanwhile
        self._created.clear()


# --------------------------------------------------------------------------- helpers


def _nearest_existing(path: Path) -> Path:
    """`path` or its closest existing ancestor (a name too long to exist counts as absent)."""
    current = Path(path.anchor)
    for part in path.parts[1:]:
        try:
            os.stat(current / part)
        except OSError:  # absent, or a name the filesystem cannot hold (checked by the caller)
            break
        current = current / part
    return current


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError):
        return default


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _identity() -> str:
    boot = ""
    with contextlib.suppress(OSError):
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return f"{socket.gethostname()} {os.getpid()} {boot}"


def _hold_lock(path: Path) -> int:
    """A lock file held (flock) until the staging folder is gone: the merge is alive.

    Locked under a temporary name and then renamed, so no other merge ever finds the
    lock file unlocked while its merge runs."""
    pending = path.with_name(path.name + ".new")
    fd = os.open(pending, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        _flock(fd)
    except OSError:
        pass  # no locks on this filesystem: others judge by the identity written below
    os.write(fd, (_identity() + "\n").encode())
    os.rename(pending, path)
    return fd


def _owner_if_alive(staging: Path, pid: int) -> Optional[str]:
    """Who holds this staging folder, or None when its merge no longer runs."""
    lock = staging / _LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        # Made a moment ago (the lock comes right after the folder), or killed in between.
        return f"pid {pid}" if _pid_alive(pid) else None
    except OSError:
        return "unknown"  # cannot tell: leave it
    try:
        _flock(fd)
        return None  # nobody holds it: its merge is gone
    except BlockingIOError:
        return f"pid {pid}"
    except OSError:
        # No locks here (some network filesystems): the same machine and boot, and a live pid.
        host, _, rest = os.read(fd, 512).decode(errors="replace").strip().partition(" ")
        owner_pid, _, boot = rest.partition(" ")
        me_host, _, me_rest = _identity().partition(" ")
        if host != me_host:
            return f"host {host}"
        if boot != me_rest.partition(" ")[2] or not owner_pid.isdigit() or not _pid_alive(int(owner_pid)):
            return None
        return f"pid {owner_pid}"
    finally:
        os.close(fd)


def _flock(fd: int) -> None:
    """An exclusive lock, now or BlockingIOError; OSError where there are no locks."""
    if fcntl is None:
        raise OSError(errno.ENOSYS, "no flock here")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """One publisher at a time in `folder` (two merges into one output: the last one wins whole)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError, AttributeError):
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits for another merge's publication
        yield
    finally:
        os.close(fd)


def _is_mergekit_card(path: Path) -> bool:
    """README.md as mergekit writes it (a user's own README.md is not a model file)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return _CARD_MARK in fh.read(8192)
    except OSError:
        return False


def _listed_shards(folder: Path, index: str) -> Set[str]:
    """Plain file names of weight shards the previous output's own index lists."""
    path = folder / index
    try:
        if not path.is_file() or path.stat().st_size > 64 << 20:
            return set()
        weight_map = json.loads(path.read_text(encoding="utf-8")).get("weight_map") or {}
        listed = set(weight_map.values())
    except (OSError, ValueError, RecursionError, AttributeError, TypeError):
        return set()  # not an index we can read: nothing it names is removed
    return {
        name for name in listed
        if isinstance(name, str) and name.endswith(WEIGHT_SUFFIXES) and name not in _NEVER
        and os.path.basename(name) == name and name not in (".", "..") and not name.startswith(STAGING_PREFIX)
        and (folder / name).is_file()
    }  # fmt: skip
