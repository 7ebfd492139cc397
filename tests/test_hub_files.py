"""How the Hub identifies a file's content (iteris_daemon/hub_files.py), against git itself."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest
from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

from iteris_daemon.hub_files import file_digest, holds, listed_hash


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.parametrize("size", [0, 1, (1 << 20) + 7])  # empty, tiny, past one read block
def test_digest_is_gits_blob_id_and_the_sha256(tmp_path, size):
    content = bytes((i * 31 + 7) % 251 for i in range(size))
    path = tmp_path / "file"
    path.write_bytes(content)
    digest = file_digest(path)
    git = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True).stdout.strip()
    assert digest.git_sha1 == git
    assert digest.sha256 == hashlib.sha256(content).hexdigest()


def test_an_lfs_file_is_judged_by_its_sha256_never_by_the_pointers_blob_id(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(b"weights")
    digest = file_digest(path)
    lfs = RepoSibling("adapter_model.safetensors", size=7, blob_id="0" * 40,  # the pointer's id, not the content's
                      lfs=BlobLfsInfo(size=7, sha256=digest.sha256, pointer_size=130))
    assert listed_hash(lfs) == ("sha256", digest.sha256) and holds(lfs, digest)
    other = RepoSibling("adapter_model.safetensors", size=7, blob_id=digest.git_sha1,
                        lfs=BlobLfsInfo(size=7, sha256="f" * 64, pointer_size=130))
    assert not holds(other, digest)
    plain = RepoSibling("adapter_config.json", size=7, blob_id=digest.git_sha1)
    assert listed_hash(plain) == ("git blob sha1", digest.git_sha1) and holds(plain, digest)
    bare = RepoSibling("adapter_config.json")  # listed without files_metadata
    assert listed_hash(bare) is None and not holds(bare, digest)


def test_the_bounded_progress_bars_of_many_downloads_leave_no_monitor_thread_behind():
    """Each download's size-bounded bar is a class of its own, and tqdm started a monitor
    thread per bar class that outlived its bar: a thread per file downloaded, for as long
    as the daemon ran (QA SK: 20 to 194 threads in 11 minutes of Hub commits). The bars as
    the client makes them where they show (a terminal, or the daemon's logging at INFO)."""
    import io
    import threading

    from iteris_daemon.hub_files import bounded_progress

    monitors = lambda: sum(type(t).__name__ == "TMonitor" for t in threading.enumerate())  # noqa: E731
    before = monitors()
    for _ in range(3):
        bar = bounded_progress(1 << 20)(total=1000, unit="B", disable=False, file=io.StringIO())
        bar.update(1000)
        bar.close()
    assert monitors() == before
