"""Serialized public contexts shared by the worker processes of one scoring server, on disk.

``mlflow models serve --workers N`` runs N uvicorn processes, each with its own in-memory
:class:`~lightning_privacy.mlflow_plugins.context_cache.ContextCache`. Without a shared tier, a
client whose context reached worker A is answered ``UNKNOWN_KEY_ID`` by worker B and uploads it
again (1.3-4.9 MiB per key for the digits MLP), once per worker and per eviction. A
:class:`ContextSpill` is a directory of serialized contexts, one file per key id, that every worker
of a server writes what it received into and reads what it lacks from: each key is uploaded once
per server. Public contexts are public, so the files hold nothing secret; they are still never
trusted: a file is used only when its SHA-256 is its name, and the bytes then go through the same
checks as an upload (no secret key, the model's parameters) before they are cached.

Files are written to a temporary name and renamed into place (atomic on POSIX), so a reader sees a
whole context or none. The directory is bounded in bytes: after each write the oldest files (by
modification time, refreshed on every read) are deleted until the rest fit. Several workers may
write at once, so the bound can be passed by one context per writing worker until the next write.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from lightning_privacy.errors import ServingConfigError
from lightning_privacy.mlflow_plugins.server_settings import positive_int

SPILL_DIR_ENV = "LIGHTNING_PRIVACY_CONTEXT_SPILL_DIR"
SPILL_MAX_BYTES_ENV = "LIGHTNING_PRIVACY_CONTEXT_SPILL_MAX_BYTES"
#: About 90 single-layout contexts of the digits MLP at N = 8192 fit in 1 GiB (10.8 MiB each on disk,
#: ``benchmarks/serving.py --distinct-keys``); a key evicted from here and from a worker's cache costs
#: its client one more upload when it returns (``UNKNOWN_KEY_ID``, then the context).
DEFAULT_SPILL_MAX_BYTES = 2**30
#: Name of the default directory under the temporary directory: the user id and the pid of the
#: uvicorn process that supervises the workers, so that each server has its own.
DEFAULT_DIR_PREFIX = "lightning-privacy-contexts-"
_KEY_ID = re.compile(r"[0-9a-f]{64}")
_TEMP_SUFFIX = ".partial"
_logger = logging.getLogger(__name__)


class ContextSpill:
    """A byte-bounded directory of serialized public contexts, named by key id (their SHA-256).

    Args:
        directory: where the files go; created (mode 0700) when missing. It must be a directory
            owned by this user that no other user can write to.
        max_bytes: most bytes of files kept; default from
            ``LIGHTNING_PRIVACY_CONTEXT_SPILL_MAX_BYTES``, else 1 GiB.

    Raises:
        ServingConfigError: ``max_bytes`` is not a positive integer, or ``directory`` is not a
            directory, is a symbolic link, belongs to another user or is writable by others.

    Example::

        spill = ContextSpill("/srv/contexts", max_bytes=2**30)
        spill.write(key_id, context_bytes)  # in the worker that received the upload
        spill.read(key_id)  # in any worker of the server: the bytes, or None
    """

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int | None = None) -> None:
        self.directory = Path(directory)
        self.max_bytes = positive_int(max_bytes, SPILL_MAX_BYTES_ENV, DEFAULT_SPILL_MAX_BYTES)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_private_directory(self.directory)

    @classmethod
    def from_env(cls) -> ContextSpill | None:
        """The spill tier of this server process, or ``None`` where there is nothing to share.

        ``LIGHTNING_PRIVACY_CONTEXT_SPILL_DIR`` names the directory when set. Otherwise a process
        started by ``multiprocessing`` (how uvicorn starts each of several workers) gets
        ``<temp dir>/lightning-privacy-contexts-<uid>-<pid of the parent>``, shared with its sibling
        workers; directories of servers that no longer run are removed first. A process of its own
        (one worker, or a model loaded in a notebook) gets ``None``.

        Raises:
            ServingConfigError: as the constructor.
        """
        directory = os.environ.get(SPILL_DIR_ENV)
        if directory:
            return cls(directory)
        parent = multiprocessing.parent_process()
        if parent is None or parent.pid is None:
            return None
        root = Path(tempfile.gettempdir())
        _remove_stale_directories(root)
        return cls(root / f"{DEFAULT_DIR_PREFIX}{os.getuid()}-{parent.pid}")

    def read(self, key_id: str) -> bytes | None:
        """The context stored under ``key_id`` if there is one whose SHA-256 is ``key_id``.

        A file that does not hash to its name (truncated, corrupted, planted) is deleted and reads
        as absent. The caller must still check the bytes as it checks an upload.
        """
        path = self._path(key_id)
        if path is None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:  # absent, evicted meanwhile, or a link
            return None
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            data = file.read(self.max_bytes + 1)
        if len(data) > self.max_bytes or hashlib.sha256(data).hexdigest() != key_id:
            _logger.warning("Deleting %s: its content does not hash to its name.", path)
            self.discard(key_id)
            return None
        _touch(path)  # most recently used: evicted last
        return data

    def write(self, key_id: str, data: bytes) -> None:
        """Store ``data`` (whose SHA-256 must be ``key_id``) for the other workers, then evict.

        Never raises for a full or vanished directory: the tier is a shortcut, and a worker that
        finds nothing answers ``UNKNOWN_KEY_ID`` so the client uploads again.
        """
        path = self._path(key_id)
        if path is None or len(data) > self.max_bytes or hashlib.sha256(data).hexdigest() != key_id:
            return
        if path.exists():
            _touch(path)
            return
        try:
            fd, temp = tempfile.mkstemp(dir=self.directory, prefix=f".{key_id[:16]}-", suffix=_TEMP_SUFFIX)
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(data)
                os.replace(temp, path)
            except BaseException:
                Path(temp).unlink(missing_ok=True)
                raise
        except OSError as error:
            _logger.warning("Could not share a public context through %s: %s", self.directory, error)
            return
        self.evict()

    def discard(self, key_id: str) -> None:
        """Delete the file of ``key_id`` if there is one."""
        path = self._path(key_id)
        if path is not None:
            path.unlink(missing_ok=True)

    @property
    def nbytes(self) -> int:
        """Bytes of the files in the directory now, unfinished writes included."""
        return sum(size for _, size, _ in self._files())

    def evict(self) -> None:
        """Delete the least recently used files until the rest fit in ``max_bytes``.

        Unfinished writes count too, so one left behind by a killed worker is evicted in turn.
        """
        files = sorted(self._files())
        total = sum(size for _, size, _ in files)
        for _, size, path in files:
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)  # another worker may have deleted it first
            total -= size

    def _files(self) -> list[tuple[float, int, Path]]:
        found = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    found.append((info.st_mtime, info.st_size, Path(entry.path)))
        return found

    def _path(self, key_id: str) -> Path | None:
        # The key id comes from the request: only a SHA-256 in hex may become a file name.
        return self.directory / key_id if _KEY_ID.fullmatch(key_id) else None


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _check_private_directory(directory: Path) -> None:
    info = directory.lstat()
    problem = None
    if not stat.S_ISDIR(info.st_mode):
        problem = "is not a directory (or is a symbolic link)"
    elif info.st_uid != os.getuid():
        problem = f"belongs to user id {info.st_uid}, not to this server's ({os.getuid()})"
    elif info.st_mode & 0o022:
        problem = f"is writable by other users (mode {stat.S_IMODE(info.st_mode):o})"
    if problem is not None:
        raise ServingConfigError(
            f"The public-context spill directory {directory} {problem}; set {SPILL_DIR_ENV} to a directory "
            "that only this server's user can write."
        )


def _remove_stale_directories(root: Path) -> None:
    """Remove this user's default spill directories whose server process is gone."""
    prefix = f"{DEFAULT_DIR_PREFIX}{os.getuid()}-"
    for path in root.glob(f"{prefix}*"):
        pid = path.name[len(prefix) :]
        if pid.isdigit() and not _alive(int(pid)) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
