"""Where the daemon keeps its files, following systemd's directories when it runs
as a service (``StateDirectory=``/``CacheDirectory=``) and the XDG base directories
otherwise. Both are created private (0700)."""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, BinaryIO

from pydantic import AfterValidator

log = logging.getLogger(__name__)


def _first(variable: str) -> Path | None:
    value = os.environ.get(variable)
    return Path(value.split(":")[0]) if value else None


def state_dir() -> Path:
    """The catalog lives here: ``$STATE_DIRECTORY``, else ``$XDG_STATE_HOME/iteris-daemon``."""
    xdg = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return _first("STATE_DIRECTORY") or xdg / "iteris-daemon"


def cache_dir() -> Path:
    """Downloaded Hub adapters: ``$CACHE_DIRECTORY``, else ``$XDG_CACHE_HOME/iteris-daemon``."""
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return _first("CACHE_DIRECTORY") or xdg / "iteris-daemon"


_CONFIG_FOLDER: ContextVar[Path | None] = ContextVar("config_folder", default=None)


@contextmanager
def relative_to(folder: Path) -> Iterator[None]:
    """Within it, :func:`absolute` and :func:`model_location` take a relative path from
    ``folder`` (a config file's), not from the working directory: the daemon runs in ``/``
    under systemd, an admin's command wherever the admin stands, and both read one config."""
    token = _CONFIG_FOLDER.set(folder)
    try:
        yield
    finally:
        _CONFIG_FOLDER.reset(token)


def _anchored(path: Path) -> Path:
    """``path`` from the folder :func:`relative_to` gives, if any (an absolute one as it is)."""
    folder = _CONFIG_FOLDER.get()
    return path if folder is None else folder / path


def absolute(path: Path) -> Path:
    """A configured path as it must be read from anywhere: ``~`` expanded, made absolute
    (a service runs in ``/``, and settings stored in the catalog are read by other processes)."""
    return _anchored(Path(path).expanduser()).resolve()


def user_path(text: str) -> Path:
    """A path given on the command line, ``~`` expanded: the shell leaves it in
    ``--folder=~/loras`` and in quotes."""
    try:
        return Path(text).expanduser()
    except RuntimeError:  # ~name of no such user: taken as written, and the error names it
        return Path(text)


def folder_name(folder: Path) -> str:
    """The name a folder goes by, ``.`` and ``..`` resolved first (``Path(".").name`` is "":
    ``--adapter .`` made a task named "" in reports and model cards), links not followed (a
    link ``current -> v3`` is ``current``, as its user named it)."""
    whole = os.path.abspath(folder)
    return Path(whole).name or whole  # the root has no name


def model_location(name: str) -> str:
    """A base model as given: a local folder (``./model``, ``~/models/x``, or a relative path
    that exists) becomes its absolute path, as :func:`absolute`; anything else is a Hub repo
    id and stays as it is."""
    folder = _anchored(Path(name).expanduser())
    return str(folder.resolve()) if name.startswith(("~", ".", "/")) or folder.is_dir() else name


def overlap(a: Path, b: Path) -> bool:
    """One path holds, or is, the other (compared as given: resolve links first where they matter)."""
    return a.is_relative_to(b) or b.is_relative_to(a)


def real(path: Path | str) -> Path:
    """``path`` with every link resolved, without raising on a loop (its reader names that)."""
    return Path(os.path.realpath(path))


def hub_repo_id(repo_id: str) -> str:
    """``repo_id`` if the Hub takes it as OWNER/NAME, else a ValueError saying why (the Hub
    source's rule, imported only here: loading the plugins stays light for the workers)."""
    from .sources.hub import bad_repo_id

    if (problem := bad_repo_id(repo_id)) is not None:
        raise ValueError(f"{repo_id!r} {problem}")
    return repo_id


# Pydantic field types for settings that name files, models and Hub repos.
LocalPath = Annotated[Path, AfterValidator(absolute)]
ModelLocation = Annotated[str, AfterValidator(model_location)]
RepoId = Annotated[str, AfterValidator(hub_repo_id)]


def private_dir(path: Path) -> Path:
    """Create ``path`` readable by its owner only; an existing one is left as it is,
    with a warning when others can read it (it may be shared on purpose)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("%s is open to other users (mode %o); the daemon's state belongs in a private folder: chmod 700 %s",
                    path, mode, path)
    return path


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (changing it,
    even for an instant, would apply to files other threads create meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_if_created(folder: Path) -> None:
    """Give ``folder`` and the files in it the modes a plain ``mkdir`` and ``open`` would
    have under the umask: a temporary folder is 0700 and safetensors writes its files 0600,
    whatever the umask, so another account (a server's) could not read a merge."""
    mask = umask()
    folder.chmod(0o777 & ~mask)
    for item in folder.iterdir():
        if item.is_file() and not item.is_symlink():
            item.chmod(0o666 & ~mask)


def staging_folder(target: Path, beside: Path | None = None) -> Path:
    """A new empty folder to write ``target``'s next content into, hidden beside it (or in
    ``beside``), for :func:`replace_folder`."""
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=beside or target.parent))


@contextmanager
def held_staging_folder(target: Path) -> Iterator[Path]:
    """:func:`staging_folder` beside ``target``, flocked until the context ends, before
    anything is written in it: :func:`remove_abandoned_staging` tells the folder of a writer
    that was killed (SIGKILL, the OOM killer: its lock is freed by the kernel) from a live
    writer's, in this process or another, by whether it can take that lock."""
    folder = staging_folder(target)
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with suppress(OSError):  # no flock on this file system (NFS may refuse one on a folder): none can take it
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield folder
    finally:
        os.close(descriptor)  # frees the lock (the folder is in place, removed, or kept, by then)


def remove_abandoned_staging(target: Path, keep: Callable[[Path], bool]) -> list[Path]:
    """Delete the staging folders of ``target`` (:func:`held_staging_folder`'s) that killed
    writers left, partial copies nothing else removes, and return them. One is left where its
    lock cannot be taken (a live writer's, another user's, a file system without flock), where
    it is empty (a writer between its mkdir and its lock), and where ``keep`` says so (a whole
    merge that an error named for its user to move)."""
    removed = []
    for folder in leftover_copies(target):
        if folder == trash_of(target) or "." in folder.name[len(target.name) + 2:]:  # .m.v2.* beside m: m.v2's
            continue
        try:
            descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile (put in place or removed), a link, not a folder, another user's
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if any(folder.iterdir()) and not keep(folder):  # removed while the lock is held
                shutil.rmtree(folder, ignore_errors=True)
                if not folder.exists():  # what could not be removed is not said to be
                    removed.append(folder)
        except OSError:  # BlockingIOError: its writer is alive; any other: not known to be dead
            pass
        finally:
            os.close(descriptor)
    return removed


def leftover_copies(target: Path) -> list[Path]:
    """The hidden half-written copies of ``target`` that a killed writer left beside it: its
    staging folders and :func:`replace_folder`'s trash."""
    return list(target.parent.glob(f".{glob.escape(target.name)}.*"))


def replace_folder(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` at ``target`` with renames only (same filesystem);
    the previous ``target``, if any, is deleted once it is out of the way."""
    if not (target.exists() or target.is_symlink()):
        os.replace(new, target)
        return
    trash = trash_of(target)
    _remove(trash)
    os.replace(target, trash)  # a symlink or a file at target is moved itself
    os.replace(new, target)
    _remove(trash)


def trash_of(target: Path) -> Path:
    """Where :func:`replace_folder` moves ``target``'s previous content before deleting it."""
    return target.with_name(f".{target.name}.old")


def _remove(path: Path) -> None:
    """Delete a folder tree, a file or a symlink (not what it points to); nothing if absent."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def open_checked(path: Path, follow: bool) -> tuple[BinaryIO, os.stat_result]:
    """``path`` opened for reading, never blocking on a FIFO (nor following a symlink unless
    ``follow``), with the fstat of what was opened: a check of that is a check of what is read
    (a file checked by name, then opened, may have been swapped for a FIFO in between)."""
    handle = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)), "rb")
    return handle, os.fstat(handle.fileno())
