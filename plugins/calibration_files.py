"""Built-in calibration sources that read JSON Lines files: ``files`` (a file mapped to
the adapter on the command line or in the config) and ``adapter`` (the adapter's own
``calibration.jsonl``, local or downloaded with it from its Hub repo)."""

from __future__ import annotations

from iteris_daemon import hookimpl
from iteris_daemon.calibration import CALIBRATION_NAME, CalibrationOptions, CalibrationSet, read_jsonl


class MappedFiles:
    name = "files"
    description = "a JSON Lines file mapped to the adapter (--adapter DIR=FILE, or the config)"

    def load(self, adapter, options: CalibrationOptions) -> CalibrationSet | None:
        path = options.files.get(adapter.name)
        return read_jsonl(path, options.limit) if path else None


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
