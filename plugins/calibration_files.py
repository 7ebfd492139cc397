"""Built-in calibration sources: a file named for the adapter on the command line or in
the config, then the adapter's own ``calibration.jsonl``."""

from __future__ import annotations

from iteris_daemon import hookimpl
from iteris_daemon.calibration import CALIBRATION_NAME, CalibrationSet, read_jsonl


@hookimpl(tryfirst=True)
def calibration_for(adapter, options) -> CalibrationSet | None:
    """An explicit mapping wins over whatever the adapter folder holds."""
    path = (options.get("files") or {}).get(adapter.name)
    return read_jsonl(path) if path else None


@hookimpl(specname="calibration_for", trylast=True)
def adapter_folder_calibration(adapter, options) -> CalibrationSet | None:
    path = adapter.path / CALIBRATION_NAME
    return read_jsonl(path) if path.is_file() else None
