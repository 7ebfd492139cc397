"""Built-in calibration source ``hub_dataset``: one JSON Lines file per adapter in a Hub
dataset repo, e.g. ``acme/calibration`` holding ``sentiment.jsonl``.

Settings (``CalibrationOptions.settings["hub_dataset"]``): ``repo_id``, ``filename``
(a template, default ``"{name}.jsonl"``; ``{name}`` is the adapter's catalog name),
``revision``, ``endpoint``, ``token_file``, ``cache_dir``. A missing file means
"no data here" (the next source answers); any other failure is an error.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from iteris_daemon import hookimpl
from iteris_daemon.calibration import CalibrationOptions, CalibrationSet, read_jsonl
from iteris_daemon.errors import CalibrationError, ConfigError
from iteris_daemon.paths import cache_dir
from iteris_daemon.retry import hub_retrying
from iteris_daemon.tokens import hub_token, plain


class HubDatasetSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_id: str
    filename: str = "{name}.jsonl"
    revision: str | None = None
    endpoint: str | None = None
    token_file: Path | None = None
    cache_dir: Path | None = None


class HubDataset:
    name = "hub_dataset"
    description = "a JSON Lines file per adapter in a Hub dataset repo"

    def load(self, adapter, options: CalibrationOptions) -> CalibrationSet | None:
        raw = options.settings.get(self.name)
        if not raw:
            return None
        try:
            settings = HubDatasetSettings.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError.from_validation("calibration hub_dataset", exc) from None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        from iteris_daemon.sources.hub import unsafe_path

        filename = settings.filename.format(name=adapter.name)
        if unsafe_path(filename):
            raise CalibrationError(filename, f"unsafe calibration file name for adapter {adapter.name}")
        try:
            path = hub_retrying(f"calibration {settings.repo_id}/{filename}")(
                hf_hub_download, settings.repo_id, filename, repo_type="dataset", revision=settings.revision,
                endpoint=settings.endpoint, token=plain(hub_token(settings.token_file)),
                cache_dir=settings.cache_dir or cache_dir() / "calibration",
            )
        except EntryNotFoundError:
            return None
        data = read_jsonl(path)
        return CalibrationSet(data.samples, source=f"hf://datasets/{settings.repo_id}/{filename}")


@hookimpl
def register_calibration_sources(register) -> None:
    register(HubDataset())
