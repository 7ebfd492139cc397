"""How the Hub identifies a file's content, and comparing a local file with it.

With ``files_metadata`` the Hub lists each file of a commit with the git blob sha1 of
what git stores. For a file kept in Git LFS (weights, under the Hub's default
``.gitattributes``) git stores a small pointer, so the listing's blob id is the
pointer's and the content is identified by the LFS sha256 instead. ``huggingface_hub``
checks a download's size, not its content: the Hub source and the ``hub_dataset``
calibration source check each download here, and the Hub publisher compares what it
would upload with what a branch holds. Both downloaders also stop a download past its
size limit here (:func:`bounded_progress`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.hf_api import RepoSibling
from huggingface_hub.utils import tqdm as hf_tqdm


@dataclass(frozen=True)
class FileDigest:
    git_sha1: str  # of b"blob <size>\0" + content, as git names a blob
    sha256: str


def content_digest(data: bytes) -> FileDigest:
    """Both hashes of a file whose content is ``data``."""
    return FileDigest(hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(), hashlib.sha256(data).hexdigest())


def file_digest(path: Path) -> FileDigest:
    """Both hashes of ``path`` in one read."""
    git, sha256 = hashlib.sha1(b"blob %d\0" % path.stat().st_size), hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            git.update(chunk)
            sha256.update(chunk)
    return FileDigest(git.hexdigest(), sha256.hexdigest())


def listed_hash(sibling: RepoSibling) -> tuple[str, str] | None:
    """(what, hex) the listing identifies the content by: ``("sha256", ...)`` for an LFS file,
    ``("git blob sha1", ...)`` otherwise; None when the listing carries no metadata."""
    if sibling.lfs is not None:
        return "sha256", sibling.lfs.sha256
    if sibling.blob_id:
        return "git blob sha1", sibling.blob_id
    return None


def digest_value(digest: FileDigest, what: str) -> str:
    return digest.sha256 if what == "sha256" else digest.git_sha1


def mismatch(sibling: RepoSibling, path: Path) -> str | None:
    """How the downloaded ``path`` differs from what the listing says, e.g. ``"has sha256
    1f2e.., where the listing says 9a8b.."``; None when it is the listed file, or the
    listing carries no hash to check."""
    listed = listed_hash(sibling)
    if listed is None:
        return None
    found = digest_value(file_digest(path), listed[0])
    return None if found == listed[1] else f"has {listed[0]} {found[:12]}, where the listing says {listed[1][:12]}"


def holds(sibling: RepoSibling, digest: FileDigest) -> bool:
    """Whether the listed file is the one ``digest`` describes (False when the listing has no hash)."""
    listed = listed_hash(sibling)
    return listed is not None and digest_value(digest, listed[0]) == listed[1]


class TooBig(Exception):
    """A download past its limit: claimed so (``stopped`` False), or seen to be (True)."""

    def __init__(self, size: int, stopped: bool):
        super().__init__(size)
        self.size, self.stopped = size, stopped


def bounded_progress(limit: int) -> type[hf_tqdm]:
    """A progress bar class for ``hf_hub_download`` that ends the download past ``limit``
    bytes: the client announces the size it was told (``total``) when it creates the
    bar and reports every chunk it writes (``update``), so neither a listing nor a
    Content-Length that lies can make it fetch more than ``limit`` plus one chunk."""

    class Bounded(hf_tqdm):
        # tqdm starts a monitor thread per bar class, which stays once its bar is closed: one
        # class per download left a thread per file downloaded, for as long as the daemon ran
        monitor_interval = 0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.received = kwargs.get("initial") or 0  # a resumed download starts with what it has
            total = kwargs.get("total")
            if total is not None and total > limit:
                self.close()
                raise TooBig(total, stopped=False)

        def update(self, n=1):
            self.received += n or 0
            if self.received > limit:
                raise TooBig(self.received, stopped=True)
            return super().update(n)

    return Bounded
