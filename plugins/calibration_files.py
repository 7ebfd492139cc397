"""Built-in calibration sources that read JSON Lines files: ``files`` (a file mapped to
the adapter on the command line or in the config) and ``adapter`` (the adapter's own
``calibration.jsonl``, local or downloaded with it from its Hub repo)."""

from __future__ import annotations

import os

from iteris_daemon import hookimpl
from iteris_daemon.calibration import CALIBRATION_NAME, CalibrationOptions, CalibrationSet, read_jsonl
from iteris_daemon.errors import CalibrationUnavailable


class MappedFiles:
    name = "files"
    description = "a JSON Lines file mapped to the adapter (--adapter DIR=FILE, or the config)"

    def load(self, adapter, options: CalibrationOptions) -> CalibrationSet | None:
        """The mapped file's samples. A mapped file that is not there makes a daemon's run
        wait for it (:class:`CalibrationUnavailable`): someone named it for this adapter, so it
        is a typo or a mount not up yet, and the merge without the adapter (the next source
        has none, say) replaced the one served (QA NU)."""
        path = options.files.get(adapter.name)
        if path is None:
            return None
        if not os.path.exists(path):  # missing, or a link into a mount not up yet
            what = "is a symlink to nothing (or a loop)" if os.path.islink(path) else "does not exist"
            raise CalibrationUnavailable(path, f"calibration file {what} (mapped to adapter {adapter.name})")
        return read_jsonl(path, options.limit)


class AdapterFolder:
    name = "adapter"
    description = "calibration.jsonl inside the adapter folder (or its Hub repo)"

    def load(self, adapter, options: CalibrationOptions) -> CalibrationSet | None:
        path = adapter.path / CALIBRATION_NAME
        return read_jsonl(path, options.limit) if path.is_file() else None


@hookimpl
def register_calibration_sources(register) -> None:
    register(MappedFiles())
    register(AdapterFolder())
