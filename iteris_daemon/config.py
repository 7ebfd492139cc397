"""The daemon's configuration file (TOML), validated with pydantic.

Every error names the file and the field (``groups.0.destinations.1.kind: ...``).
Sources and groups declared here are written into the catalog when the daemon
starts or reloads (SIGHUP); sources added with ``iteris-daemon sources add`` live
beside them. See ``config/iteris-daemon.example.toml``.
"""

from __future__ import annotations

import fnmatch
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import urlsplit

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError,
                      ValidationInfo, field_validator, model_validator)

from .calibration import DEFAULT_ORDER, checked_table
from .devices import check_device
from .errors import ConfigError, IterisError
from .adapter_config import MAX_CONFIG_BYTES
from .strategy import DEFAULT_STRATEGY
from .paths import LocalPath, ModelLocation, absolute, cache_dir, overlap, real, relative_to, state_dir
from .tokens import check_private, check_token_file, unreadable
from .strict import STRICT
from .validation import Limits




class _Strict(BaseModel):
    model_config = STRICT


def _not_blank(value: Any) -> Any:
    """An empty path or model name is refused: it was taken for the working directory."""
    if isinstance(value, str) and not value.strip():
        raise ValueError("empty (it would be the working directory)")
    return value


def _http_url(endpoint: str) -> str:
    """A Hub endpoint is an http(s) URL: anything else failed every request, hours later."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{endpoint!r} is not an http(s) URL")
    return endpoint


# Field types of settings tables (STRICT): a path is a TOML string, and a JSON one in the catalog.
PathSetting = Annotated[LocalPath, Strict(False), BeforeValidator(_not_blank)]
ModelSetting = Annotated[ModelLocation, BeforeValidator(_not_blank)]
HubEndpoint = Annotated[str, AfterValidator(_http_url)]


def check_backoff(settings: BaseModel, first: str, longest: str) -> None:
    """A back-off's longest wait must not be below its first one (ValueError naming both)."""
    if getattr(settings, longest) < getattr(settings, first):
        raise ValueError(f"{longest} ({getattr(settings, longest):g}) is below {first} "
                         f"({getattr(settings, first):g}), the first wait")


Device = Annotated[str, AfterValidator(check_device)]
Dtype = Literal["float32", "bfloat16", "float16"]  # model.DTYPES' names (this module does not import torch)


class AdapterLimits(_Strict):
    """What an adapter may cost before it is even read (hostile or broken files)."""

    max_weights_bytes: int = Field(Limits.max_weights_bytes, gt=0, description="size of adapter_model.safetensors")
    max_header_bytes: int = Field(Limits.max_header_bytes, gt=0, description="size of its JSON header")
    max_tensors: int = Field(Limits.max_tensors, gt=0, description="tensors in the file")
    max_rank: int = Field(Limits.max_rank, gt=0, description="LoRA rank r")
    max_calibration_bytes: int = Field(Limits.max_calibration_bytes, gt=0, description="size of calibration.jsonl")
    max_config_bytes: int = Field(Limits.max_config_bytes, gt=0, le=MAX_CONFIG_BYTES,
                                  description="size of adapter_config.json")

    def limits(self) -> Limits:
        return Limits(**self.model_dump())


# The HTTP endpoints' settings (served by iteris_daemon.endpoints).
SECRET_CREDENTIAL = "hub-webhook-secret"  # systemd: LoadCredential=hub-webhook-secret:/etc/...
MAX_SECRET_BYTES = 4096
MAX_MEMORY_LIMIT_MB = (2**63 - 1) >> 20
"""The largest worker_memory_limit_mb: setrlimit takes its bytes as a C long. Past it every
worker died in setrlimit (OverflowError), and every run and base model's shapes with it."""
MAX_SECONDS = 10 * 365 * 86400.0
"""The longest period or wait a setting may give (ten years): beyond it the scheduler's date
arithmetic overflows, which crashed the daemon at start or on a reload."""
MIN_PERIOD = 0.1
"""The shortest period a scheduled job may have (seconds): at 1e-6 a re-merge period busied
the daemon, and after the host slept APScheduler listed every period missed (an hour's
sleep: 3.6e9 of them) before running the job once."""


class HubRetrySettings(BaseModel):
    """The back-off of a Hub source's, destination's or dataset's calls (``retry.hub_retrying``)."""

    model_config = STRICT

    retry_attempts: int = Field(6, ge=1, description="tries per Hub call")
    retry_base_seconds: float = Field(
        1.0, ge=0, le=MAX_SECONDS, description="first back-off delay, doubled after each failure")
    retry_cap_seconds: float = Field(
        60.0, ge=0, le=MAX_SECONDS, description="longest back-off delay (also caps Retry-After)")

    @model_validator(mode="after")
    def _backoff(self) -> HubRetrySettings:
        check_backoff(self, "retry_base_seconds", "retry_cap_seconds")
        return self


def parse_listen(value: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[::1]:9464"`` for IPv6) as ``(host, port)``; ValueError says what is wrong."""
    host, colon, port = value.rpartition(":")
    if not colon or not (port.isascii() and port.isdigit() and len(port) <= 5):
        raise ValueError(f'expected "HOST:PORT" (IPv6 in brackets: "[::1]:9464"), got {value!r}')
    if host.startswith("[") and host.endswith("]") and ":" in host:
        host = host[1:-1]
    elif any(c in host for c in ":[]"):
        raise ValueError(f'{value!r}: an IPv6 address goes in brackets, e.g. "[::1]:9464"')
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"{value!r}: the host is empty or holds spaces")
    if int(port) > 65535:
        raise ValueError(f"{value!r}: port {int(port)} is not in 0-65535")
    return host, int(port)


class _Listening(BaseModel):
    model_config = STRICT

    listen: str = Field(description='"HOST:PORT" to listen on; "[::1]:PORT" for IPv6; port 0 picks a free one')

    @field_validator("listen")
    @classmethod
    def _valid_listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    def address(self) -> tuple[str, int]:
        """``(host, port)`` to bind, the host without IPv6 brackets."""
        return parse_listen(self.listen)


class MetricsSettings(_Listening):
    """Serve ``/metrics`` and ``/healthz`` (off unless configured)."""


class WebhookSettings(_Listening):
    """Serve the Hub webhook (off unless configured)."""

    path: str = Field("/webhooks/hub", description="URL path the Hub posts to")
    secret_file: PathSetting | None = Field(
        None, description=f"the webhook's secret (default: $CREDENTIALS_DIRECTORY/{SECRET_CREDENTIAL})")
    max_body_bytes: int = Field(1 << 20, gt=0, description="larger requests are refused unread")

    @field_validator("path")
    @classmethod
    def _valid_path(cls, value: str) -> str:
        if not value.startswith("/") or any(c.isspace() or c in "?#" for c in value):
            raise ValueError(f"{value!r}: must start with / and hold no spaces, ? or #")
        return value

    def secret_path(self) -> Path:
        """``secret_file``, else the credential systemd's ``LoadCredential`` put in place."""
        if self.secret_file is not None:
            return self.secret_file
        credentials = os.environ.get("CREDENTIALS_DIRECTORY")
        if not credentials:
            raise ConfigError(f"daemon.webhooks.secret_file: not set, and no $CREDENTIALS_DIRECTORY to find the "
                              f"systemd credential {SECRET_CREDENTIAL!r} in (LoadCredential={SECRET_CREDENTIAL}:PATH)")
        return Path(credentials) / SECRET_CREDENTIAL

    def secret(self) -> bytes:
        """The shared secret, trailing whitespace removed. Errors name the file, never its content.
        A configured file open to the group or others is refused, as a Hub token file is
        (systemd's credential is the service's own)."""
        path = self.secret_path()
        try:
            with open(path, "rb") as handle:
                if self.secret_file is not None:
                    check_private(handle, path, f"daemon.webhooks.secret_file {path}:")
                secret = handle.read(MAX_SECRET_BYTES + 1)
        except FileNotFoundError:
            raise ConfigError(f"daemon.webhooks.secret_file {path}: does not exist") from None
        except OSError as exc:
            raise ConfigError(f"daemon.webhooks.secret_file {path}: {unreadable(exc)}") from None
        if len(secret) > MAX_SECRET_BYTES:
            raise ConfigError(f"daemon.webhooks.secret_file {path}: longer than {MAX_SECRET_BYTES} bytes")
        if not secret.rstrip():
            raise ConfigError(f"daemon.webhooks.secret_file {path}: is empty")
        return secret.rstrip()


def check_cron(cron: str) -> None:
    """Refuse a crontab expression cron would not read, or one that never fires."""
    from .crontab import CrontabTrigger  # not at import: APScheduler and croniter are the daemon's

    CrontabTrigger(cron)


class PruneSettings(_Strict):
    """``[daemon.prune]``: the daemon deletes the catalog's old history itself, as
    ``iteris-daemon db prune`` does, on a schedule (a daemon run for months otherwise grows
    its catalog without bound)."""

    older_than_days: float = Field(90.0, ge=0, le=100_000,
                                   description="delete what is older than this and not read (db prune --older-than)")
    keep_runs: int | None = Field(None, description="each group's newest runs always kept (db prune --keep-runs; "
                                                    "default and least: the ones `status` reads)")
    cron: str = Field("30 4 * * *", description="when, a crontab expression in UTC (default: daily at 04:30)")

    @field_validator("keep_runs")
    @classmethod
    def _reads_kept(cls, keep_runs: int | None) -> int | None:
        from .catalog.prune import RECENT_RUNS  # not at import: the catalog's modules import this one

        if keep_runs is not None and keep_runs < RECENT_RUNS:
            raise ValueError(f"at least {RECENT_RUNS} (the runs `status` reads), got {keep_runs}")
        return keep_runs

    @field_validator("cron")
    @classmethod
    def _fires(cls, cron: str) -> str:
        check_cron(cron)
        return cron


class DaemonSettings(_Strict):
    database: str | None = Field(None, description="SQLAlchemy URL (default: a SQLite file in the state directory)")
    state_dir: PathSetting | None = Field(None, description="default: $STATE_DIRECTORY or ~/.local/state/iteris-daemon")
    cache_dir: PathSetting | None = Field(None, description="default: $CACHE_DIRECTORY or ~/.cache/iteris-daemon")
    grace_seconds: float = Field(
        60.0, ge=0, le=MAX_SECONDS, description="a cancelled merge's worker (SIGTERM) is killed after this long")
    claim_ttl_seconds: float = Field(
        120.0, ge=1, le=MAX_SECONDS, description="a group claim not refreshed for this long is stale")
    retry_seconds: float = Field(
        30.0, ge=0, le=MAX_SECONDS,
        description="a run that could not be carried out (the catalog locked or unreachable), or whose merge could "
                    "not be published (a destination down), is tried again after this long, doubling after each such "
                    "failure up to retry_max_seconds; 0: only the group's schedule, its next change or a restart try "
                    "again")
    retry_max_seconds: float = Field(900.0, gt=0, le=MAX_SECONDS, description="the longest wait between such attempts")
    device: Device = Field("cpu", description="where merges run, when devices is not given: cpu, cuda or cuda:N")
    devices: list[Device] | None = Field(
        None, min_length=1, description='devices merges run on, one merge per entry at a time (default: [device]), e.g. '
                                        '["cuda:0", "cuda:1"]; a device listed twice takes two merges at once')
    max_concurrent_merges: int | None = Field(None, ge=1, description="default: one per device")
    worker_memory_limit_mb: int | None = Field(
        None, gt=0, le=MAX_MEMORY_LIMIT_MB, description="address-space limit of each merge worker on the CPU (RLIMIT_AS); past it the run fails, "
                                "the daemon goes on (default: none). Not applied to a CUDA merge's worker: CUDA "
                                "cannot start under it (limit its host memory through the unit's MemoryMax)")
    trust_remote_code: list[ModelSetting] = Field(
        default_factory=list, description="base models allowed to run their own code (when checking adapters and merging)")
    limits: AdapterLimits = Field(default_factory=AdapterLimits)
    rescan_seconds: float = Field(
        600.0, ge=MIN_PERIOD, le=MAX_SECONDS, description="full rescan of local folders (a safety net for lost events)")
    catalog_check_seconds: float = Field(
        30.0, ge=MIN_PERIOD, le=MAX_SECONDS,
        description="how often groups are compared with the catalog: a change no source of this daemon reported "
                    "(`sources scan`, `sources remove`, another daemon on the catalog) merges then, and sources "
                    "`sources add` or `sources remove` changed start or stop")
    hub_timeout_seconds: float = Field(
        120.0, gt=0, le=MAX_SECONDS,
        description="a Hub request without its own timeout (the publisher's commits, tags, repo creation; "
                    "calibration downloads) gives up after this long without a byte, and is retried")
    metrics: MetricsSettings | None = Field(None, description="serve /metrics (Prometheus) and /healthz (off by default)")
    webhooks: WebhookSettings | None = Field(None, description="accept Hub webhooks: poll a repo when it changes (off by default)")
    prune: PruneSettings | None = Field(None, description="delete old catalog history on a schedule (off by default)")

    @field_validator("database")
    @classmethod
    def _database_url(cls, url: str | None) -> str | None:
        """A URL SQLAlchemy reads, of a dialect it knows: a mistake was found only where the
        catalog opened, in an error naming neither this file nor this field. Shown with its
        password masked. A SQLite file's relative path is taken from the config's folder, as
        every path in it: from the working directory, each command run elsewhere made and
        used a catalog of its own (and the daemon under systemd one under ``/``)."""
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError

        from .catalog.db import mask_password

        if url is None:
            return None
        try:
            make_url(url).get_dialect()
        except (NoSuchModuleError, ImportError) as exc:  # before ArgumentError, its base class
            raise ValueError(f"{mask_password(url)!r}: {exc}") from None
        except (ArgumentError, ValueError):  # ValueError: a port that is no number
            raise ValueError(f"{mask_password(url)!r} is not a SQLAlchemy URL (a SQLite file is written "
                             "sqlite:////abs/path.db)") from None
        parsed = make_url(url)
        if (parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")
                and not Path(parsed.database).expanduser().is_absolute()
                and not parsed.query.get("uri")):  # a file: URI is SQLite's to read
            anchored = absolute(Path(parsed.database))
            if not anchored.exists() and Path(parsed.database).resolve().exists():
                # where earlier releases found it: an empty catalog made here would re-register and re-publish all
                raise ValueError(f"{parsed.database!r}: a relative path is taken from the config's folder, "
                                 f"{anchored}, which does not exist; the catalog is at {Path(parsed.database).resolve()} "
                                 "(from the working directory, as before 2026-12-07): give that path")
            return parsed.set(database=str(anchored)).render_as_string(hide_password=False)
        return url

    @model_validator(mode="after")
    def _retry_range(self) -> DaemonSettings:
        check_backoff(self, "retry_seconds", "retry_max_seconds")
        return self

    def catalog_url(self) -> str:
        """The catalog's SQLAlchemy URL: ``database``, else ``catalog.db`` in the state directory."""
        from .catalog.db import sqlite_url

        return self.database or sqlite_url((self.state_dir or state_dir()) / "catalog.db")

    def cache_path(self) -> Path:
        """The cache directory: ``cache_dir``, else the default one."""
        return self.cache_dir or cache_dir()

    def merge_devices(self) -> list[str]:
        """The devices merges run on, one merge each at a time."""
        return list(self.devices or [self.device])

    def merge_slots(self) -> int:
        """How many merges may run at once."""
        return min(self.max_concurrent_merges or len(self.merge_devices()), len(self.merge_devices()))

    def slot_devices(self) -> list[str]:
        """The device of each merge slot: the first ``merge_slots()`` of ``merge_devices()``."""
        return self.merge_devices()[: self.merge_slots()]


def printable_name(name: str) -> str:
    """A source's or group's name: logs, `status` and metrics labels name it, so 1 to 200
    printable characters (a newline forged lines), not only spaces."""
    if not name.strip() or len(name) > 200 or not name.isprintable():
        raise ValueError(f"a name has 1 to 200 printable characters, not only spaces: {name!r}")
    return name


Name = Annotated[str, AfterValidator(printable_name)]


class SourceConfig(_Strict):
    """One ``[[sources]]`` table: ``name``, ``kind`` and the kind's settings."""

    model_config = ConfigDict(extra="allow")

    name: Name
    kind: Literal["local", "hub"]

    def validated(self) -> BaseModel:
        """The kind's settings (``LocalSettings`` or ``HubSettings``), validated."""
        from .sources.hub import HubSettings
        from .sources.local import LocalSettings

        return (LocalSettings if self.kind == "local" else HubSettings).model_validate(self.model_extra or {})

    def settings(self) -> dict[str, Any]:
        """What the catalog stores: the settings given, validated (paths made absolute)."""
        return self.validated().model_dump(mode="json", exclude_unset=True)


class Selection(_Strict):
    """Which registered adapters a group merges (all filters must hold)."""

    sources: list[str] | None = Field(None, description="only adapters of these sources (default: all)")
    names: list[str] = Field(default_factory=lambda: ["*"], min_length=1,
                             description="fnmatch patterns on adapter names")
    ids: list[int] | None = Field(None, description="only these adapter ids")

    def matches(self, source: str, name: str, adapter_id: int) -> bool:
        if self.sources is not None and source not in self.sources:
            return False
        if self.ids is not None and adapter_id not in self.ids:
            return False
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.names)


class CalibrationConfig(_Strict):
    """Calibration sources, asked in ``order``; the rest are each source's settings."""

    model_config = ConfigDict(extra="allow")

    order: list[str] = Field(default_factory=lambda: list(DEFAULT_ORDER))
    files: dict[str, PathSetting] = Field(default_factory=dict, description="adapter name -> JSON Lines file")

    def source_settings(self) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in (self.model_extra or {}).items() if isinstance(v, dict)}


class Gates(_Strict):
    """What a merge must show before it is published (measured on the calibration data).

    The fidelity gap of a task is ``||y_merged - y_task|| / ||y_task - y_base||`` on
    its calibration inputs: 0 behaves like the task's own adapter, 1 like the base model.
    """

    max_fidelity_gap: float | None = Field(
        1.5, gt=0, description="refuse the merge when a task's fidelity gap exceeds this (None/false: no limit); "
                               "above 1 the merge is farther from the task's behaviour than the base model is")
    max_regression: float | None = Field(
        0.05, ge=0, description="refuse the merge when its mean fidelity gap is worse than the published merge's "
                                "by more than this, unless forced (None/false: never compare)")
    max_added_loss: float | None = Field(
        None, ge=0, description="language models that generate: refuse the merge when a task's next-token loss "
                                "under it exceeds the task's own adapter's by more than this, in nats per token "
                                "(None/false, the default: no limit)")

    @field_validator("max_fidelity_gap", "max_regression", "max_added_loss", mode="before")
    @classmethod
    def _false_disables(cls, value: Any) -> Any:
        if value is True:
            raise ValueError("give a number, or false to turn the gate off")
        return None if value is False else value  # TOML has no null: `= false` turns a gate off


class GroupConfig(_Strict):
    name: Name
    base_model: ModelSetting
    strategy: str = DEFAULT_STRATEGY
    params: dict[str, Any] = Field(default_factory=dict)
    select: Selection = Field(default_factory=Selection)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    interval_seconds: float | None = Field(None, ge=MIN_PERIOD, le=MAX_SECONDS, description="re-merge period")
    cron: str | None = Field(None, description="crontab expression for re-merges, e.g. '0 3 * * *'")
    debounce_seconds: float = Field(30.0, ge=0, le=MAX_SECONDS,
                                    description="merge this long after the last change to the group's adapters, "
                                                "at most 4 times this after the first")
    min_adapters: int = Field(1, ge=1, description="do not merge fewer adapters than this")
    dtype: Dtype = Field("float32", description="the base model's compute dtype while merging (as merge --dtype); "
                                                "bfloat16 halves the memory of blocks and hidden states")
    output_dtype: Dtype | None = Field(None, description="the merged adapter's dtype (as merge --output-dtype; "
                                                         "default: the widest of the inputs')")
    offload: Literal["auto", "disk", "cpu", "none"] = Field(
        "auto", description="where block weights wait while another block is computed on (as merge --offload)")
    exact_ranks: bool = Field(False, description="write each layer at its own rank (as merge --exact-ranks; only "
                                                 "PEFT >= 0.15 loads it) instead of zero-padded to the largest")
    modules_to_save_rule: str = Field(
        "agree", min_length=1, description="adapters' modules_to_save (classifier heads) that differ: 'average', or an "
                                           "adapter's name to take its own (as merge --modules-to-save-rule)")
    gates: Gates = Field(default_factory=Gates)
    destinations: list[dict[str, Any]] = Field(min_length=1)

    def precision(self) -> dict[str, str | bool]:
        """The dtypes, ``exact_ranks`` and ``modules_to_save_rule`` set away from their
        defaults: the merge depends on them (the run's input fingerprint includes them; with
        the defaults it is what it was before they could be set). Where block weights wait
        does not change the merge."""
        return {key: getattr(self, key) for key in ("dtype", "output_dtype", "exact_ranks", "modules_to_save_rule")
                if getattr(self, key) != type(self).model_fields[key].default}

    @model_validator(mode="after")
    def _one_schedule(self) -> GroupConfig:
        if self.interval_seconds is not None and self.cron is not None:
            raise ValueError("give interval_seconds or cron, not both")
        if self.cron is not None:
            check_cron(self.cron)
        return self

    @field_validator("select")
    @classmethod
    def _selects_something(cls, select: Selection) -> Selection:
        """An empty list selected nothing, for ever (checked here, not in Selection, which
        also reads the selections stored in the catalog, an older config's included)."""
        for field in ("sources", "ids"):
            if getattr(select, field) == []:
                raise ValueError(f"{field} = [] selects nothing; leave it out to select by the other filters")
        if any(not pattern for pattern in select.names):
            raise ValueError('names: "" matches no adapter name; "*" matches every one')
        if any(adapter_id < 1 for adapter_id in select.ids or ()):
            raise ValueError("ids: adapter ids are 1 or more (`iteris-daemon adapters list` shows them)")
        return select

    @field_validator("destinations")
    @classmethod
    def _kinds(cls, destinations: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for destination in destinations:
            if not isinstance(destination.get("kind"), str):
                raise ValueError("every destination needs a kind (e.g. 'folder', 'hub')")
        return destinations


class DaemonConfig(_Strict):
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    sources: list[SourceConfig] = Field(default_factory=list)
    groups: list[GroupConfig] = Field(default_factory=list)

    @field_validator("sources", "groups")
    @classmethod
    def _unique_names(cls, items: list[SourceConfig] | list[GroupConfig], info: ValidationInfo
                      ) -> list[SourceConfig] | list[GroupConfig]:
        names = [item.name for item in items]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"{info.field_name.removesuffix('s')} name {duplicates[0]!r} is used twice")
        return items


def load_config(path: Path, *, check_plugins: bool = True, check_sources: bool = False) -> DaemonConfig:
    """Read and validate ``path``; every problem is a :class:`ConfigError` naming it.
    ``check_plugins=False`` skips what needs the plugins loaded (strategy parameters,
    destination and source settings) or the daemon's environment (where the webhook
    secret is): enough for a command that only needs the catalog. ``check_sources``
    checks the source settings even so, for the catalog commands: `sources scan` writes
    them into the catalog, and a bad one was a traceback there that printed its value (a
    token pasted inline, say). `status` and `merge-now` do not read them, and stay clear
    of the Hub client's and the watcher's imports."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    with relative_to(Path(path).absolute().parent):
        _anchor_tables(raw, check_plugins, check_sources)
        try:
            config = DaemonConfig.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError.from_validation(str(path), exc) from None
        if check_plugins or check_sources:
            watched, polled = _check_sources(config, path, readable=check_plugins)
        if check_plugins:
            _check_plugins(config, path, watched, polled)
    if check_plugins and config.daemon.webhooks is not None:
        try:
            config.daemon.webhooks.secret()  # there and readable now, not found missing once the start began
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return config


def _anchor_tables(raw: dict[str, Any], check_plugins: bool, check_sources: bool) -> None:
    """The relative paths of the tables that are validated again later, elsewhere (sources'
    settings, stored in the catalog; destinations' and calibration sources', read by
    publishers and workers), made absolute in ``raw`` under the config's folder, as their
    settings would make them (without the plugins: the sources' alone; without either, none:
    `status` keeps clear of the sources' imports)."""
    def tables(value: Any) -> list[dict[str, Any]]:
        return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []

    if (check_plugins or check_sources) and (configured := tables(raw.get("sources"))):
        from .sources.hub import HubSettings
        from .sources.local import LocalSettings

        for source in configured:
            _anchor(source, {"local": LocalSettings, "hub": HubSettings}.get(source.get("kind")), ("name", "kind"))
    if not check_plugins:
        return
    from .plugin_manager import calibration_sources, publishers

    kinds, sources = publishers(), calibration_sources()
    for group in tables(raw.get("groups")):
        for destination in tables(group.get("destinations")):
            kind = destination.get("kind")
            _anchor(destination, getattr(kinds.get(kind) if isinstance(kind, str) else None, "Settings", None), ("kind",))
        calibration = group.get("calibration")
        for name, table in calibration.items() if isinstance(calibration, dict) else ():
            if isinstance(table, dict):
                _anchor(table, getattr(sources.get(name), "Settings", None), ())


def _anchor(table: dict[str, Any], model: type[BaseModel] | None, other: tuple[str, ...]) -> None:
    """Each value of ``table`` (less the ``other`` keys) that is a relative path, or a list
    holding one, replaced by the absolute path(s) ``model`` makes of it; left as it is where
    the table is not valid (its check says why later) or ``model`` makes no path of it (a
    Hub id, a URL)."""
    if model is None:
        return
    try:
        made = model.model_validate({k: v for k, v in table.items() if k not in other}).model_dump(
            mode="json", by_alias=True, exclude_unset=True)
    except (ValidationError, IterisError):
        return

    def strings(value: Any) -> list[str]:
        items = value if isinstance(value, list) else [value]
        return items if items and all(isinstance(item, str) for item in items) else []

    for key, value in table.items():
        given, paths = strings(value), strings(made.get(key)) if key not in other else []
        if (given and paths and any(not item.startswith(("/", "~")) for item in given)
                and all(item.startswith("/") for item in paths)):
            table[key] = made[key]


def _check_sources(config: DaemonConfig, path: Path, *, readable: bool
                   ) -> tuple[list[tuple[str, Path]], list[tuple[str, BaseModel]]]:
    """Each source's settings, and its folders apart from the others' and from the daemon's
    own; returns (source name, folder) of every local source's folder and (source name,
    settings) of every Hub source, for the destinations' checks. ``readable``: a token file
    must be readable by this user too (the daemon's; another may run `status`)."""
    watched: list[tuple[str, Path]] = []  # (source name, folder) of every local source
    polled: list[tuple[str, BaseModel]] = []  # (source name, settings) of every Hub source
    for index, source in enumerate(config.sources):
        try:
            settings = source.validated()
        except ValidationError as exc:
            raise ConfigError.from_validation(f"{path}: sources.{index} ({source.name})", exc) from None
        if (token_file := getattr(settings, "token_file", None)) is not None:
            check_token_file(token_file, f"{path}: sources.{index} ({source.name}): token_file", readable=readable)
        for folder in getattr(settings, "paths", []):
            if (why := watched_elsewhere(folder, watched)) is not None:
                raise ConfigError(f"{path}: sources.{index} ({source.name}): {why}")
            if (own := _holding(folder, written_folders(config.daemon))) is not None:
                raise ConfigError(f"{path}: sources.{index} ({source.name}): {folder} holds the daemon's {own[0]} "
                                  f"{own[1]}; the daemon would register its own merges and downloads as adapters")
        watched += [(source.name, folder) for folder in getattr(settings, "paths", [])]
        polled += [(source.name, settings)] if hasattr(settings, "watches") else []
    return watched, polled


def watched_elsewhere(folder: Path, watched: list[tuple[str, Path]]) -> str | None:
    """Why ``folder`` cannot be a source's: it overlaps a folder of ``watched`` (source name,
    folder), whose adapters both sources would register; None when it overlaps none."""
    if (other := first_overlap(folder, watched)) is None:
        return None
    return f"{folder} overlaps the folder {other[1]} that source {other[0]!r} watches; one folder belongs to one source"


def _check_plugins(config: DaemonConfig, path: Path, watched: list[tuple[str, Path]],
                   polled: list[tuple[str, BaseModel]]) -> None:
    """Strategies, parameters and destinations must be valid before anything runs."""
    from .plugin_manager import calibration_sources, get_strategy
    from .strategy import by_adapter_name, parse_params, per_adapter_fields

    available = calibration_sources()
    published: list[tuple[str, Path]] = []  # (group name, folder) of every folder destination so far
    branches: list[tuple[str, tuple[str | None, str, str]]] = []  # (group name, Hub branch) of every Hub one so far
    for index, group in enumerate(config.groups):
        where = f"{path}: groups.{index} ({group.name})"
        try:
            strategy = get_strategy(group.strategy)
            tables = {key: list(table) for key in per_adapter_fields(strategy.Params)
                      if isinstance(table := group.params.get(key), dict)}
            parse_params(strategy, by_adapter_name(strategy, group.params, None), entry_names=tables)
            order = group.calibration.order
            unknown = [n for n in order if n not in available]
            if unknown:
                raise ConfigError(f"unknown calibration source {unknown[0]!r}; available: {', '.join(sorted(available))}")
            if group.calibration.files and "files" not in order:  # the mapping would be ignored
                raise ConfigError(f"calibration.files: a mapping for a source that calibration.order does not list "
                                  f"({', '.join(order) or 'empty'}); add 'files' to the order or drop the mapping")
            if not order and strategy.needs_calibration:  # every adapter would be held back, for ever
                raise ConfigError(f"calibration.order is empty, and strategy {group.strategy} needs calibration data; "
                                  f"list the sources to ask (available: {', '.join(sorted(available))})")
            for key, value in (group.calibration.model_extra or {}).items():  # a typo was ignored silently
                if key not in available or not isinstance(value, dict):
                    raise ConfigError(f"calibration.{key}: not a calibration source's settings table (sources: "
                                      f"{', '.join(sorted(available))}; fields: order, files)")
                settings = checked_table(available[key], value)  # a source without Settings takes none
                if (token_file := getattr(settings, "token_file", None)) is not None:
                    check_token_file(token_file, f"calibration.{key}.token_file")
                if key not in order:  # its settings would be ignored: the source is never asked
                    raise ConfigError(f"calibration.{key}: settings for a source that calibration.order does not "
                                      f"list ({', '.join(order) or 'empty'}); add {key!r} to the order or drop the table")
            for number, destination in enumerate(group.destinations):
                try:
                    settings = _publisher_settings(destination)
                except ValidationError as exc:
                    raise ConfigError.from_validation(f"destinations.{number}", exc) from None
                if (token_file := getattr(settings, "token_file", None)) is not None:
                    check_token_file(token_file, f"destinations.{number}.token_file")
                place = _destination(settings)
                if isinstance(place, Path):
                    _check_destination_folder(place, watched, published, f"destinations.{number}.path")
                    published.append((group.name, place))
                elif place is not None:
                    _check_destination_repo(place, polled, branches, f"destinations.{number}.repo_id")
                    branches.append((group.name, place))
        except IterisError as exc:  # unknown strategy or source, bad parameters or settings
            raise ConfigError(f"{where}: {exc}") from None


class Destinations(NamedTuple):
    """Where a config's groups publish, for the rule that no source watches it: (group name,
    folder) of each folder destination, and (group name, (endpoint, repo id, branch)) of each
    Hub one. A destination is told by its settings' fields: ``path`` or ``repo_id``."""

    folders: list[tuple[str, Path]]
    repos: list[tuple[str, tuple[str | None, str, str]]]
    written: list[tuple[str, Path]] = []  # (what, folder) the daemon writes itself: its state and cache folders


def _publisher_settings(destination: dict[str, Any]) -> BaseModel:
    """A destination's table validated by its publisher's ``Settings`` (a ``ValidationError`` if bad)."""
    from .plugin_manager import get_publisher

    return get_publisher(destination["kind"]).Settings.model_validate(
        {k: v for k, v in destination.items() if k != "kind"})


def _destination(settings: BaseModel) -> Path | tuple[str | None, str, str] | None:
    """The folder (resolved) or Hub branch (endpoint, repo id, branch) a destination's settings
    publish into; None for neither."""
    folder, repo = getattr(settings, "path", None), getattr(settings, "repo_id", None)
    if isinstance(folder, Path):
        return folder.expanduser().resolve()
    if isinstance(repo, str):
        return getattr(settings, "endpoint", None), repo, getattr(settings, "branch", "main")
    return None


def destinations(config: DaemonConfig) -> Destinations:
    """The folders and Hub branches a checked config's groups publish into."""
    places = [(group.name, place) for group in config.groups for destination in group.destinations
              if (place := _destination(_publisher_settings(destination))) is not None]
    return Destinations([(g, p) for g, p in places if isinstance(p, Path)],
                        [(g, p) for g, p in places if not isinstance(p, Path)], written_folders(config.daemon))


def config_destinations(config: DaemonConfig, path: Path) -> Destinations:
    """:func:`destinations` of the config at ``path`` read without its plugins (by the catalog
    commands, which leave its destinations as written): a relative folder is taken from the
    config's folder, as the daemon's reading takes it, not from the working directory."""
    with relative_to(Path(path).absolute().parent):
        try:
            return destinations(config)
        except ValidationError as exc:
            raise ConfigError.from_validation(f"{path}: a destination", exc) from None
        except IterisError as exc:  # an unknown destination kind
            raise ConfigError(f"{path}: {exc}") from None


def written_folders(settings: DaemonSettings) -> list[tuple[str, Path]]:
    """The folders the daemon writes besides its destinations: runs (merges, published and
    kept copies) under the state folder, Hub downloads under the cache folder."""
    return [("state folder", settings.state_dir or state_dir()), ("cache folder", settings.cache_path())]


def _holding(folder: Path, written: list[tuple[str, Path]]) -> tuple[str, Path] | None:
    """The first (what, folder) of ``written`` that is ``folder`` or lies in it, links resolved,
    unless in a hidden folder there (a source does not look into those)."""
    for what, own in written:
        inside, watched = real(own), real(folder)
        if inside.is_relative_to(watched) and not any(p.startswith(".") for p in inside.relative_to(watched).parts):
            return what, own
    return None


def watched_destination(settings: BaseModel, published: Destinations) -> str | None:
    """Why a source (its validated settings) must not run beside these destinations:
    it watches one, so each merge would come back as an adapter, merged into the next,
    without end; None when it watches none."""
    for folder in getattr(settings, "paths", []):
        if (group := first_overlap(Path(folder), published.folders)) is not None:
            return f"its folder {folder} overlaps the destination {group[1]} of group {group[0]!r}"
        if (own := _holding(Path(folder), published.written)) is not None:
            return f"its folder {folder} holds the daemon's {own[0]} {own[1]}"
    watches = getattr(settings, "watches", None)
    for group, (endpoint, repo, branch) in published.repos if watches is not None else ():
        if watches(endpoint, repo, branch):
            return f"it polls {repo}@{branch}, where group {group!r} publishes"
    return None


def _check_destination_repo(repo: tuple[str | None, str, str], polled: list[tuple[str, BaseModel]],
                            published: list[tuple[str, tuple[str | None, str, str]]], field: str) -> None:
    """A Hub destination must not be a branch a Hub source polls: its merges would come back
    as adapters (an author's repos include the one the merge is published to). Nor the branch
    of another destination: it would serve whichever merge was committed last, and `status`
    would report each group's merge as published there."""
    from .sources.hub import same_branch

    for name, settings in polled:
        if settings.watches(*repo):
            raise ConfigError(f"{field}: {repo[1]}@{repo[2]} is polled by source {name!r}; the daemon would register "
                              "its own merges as adapters (publish to a repo or branch the source does not poll, or "
                              "list the source's repos instead of its author)")
    for group, other in published:
        if same_branch(repo, other):
            raise ConfigError(f"{field}: {repo[1]}@{repo[2]} is already the destination of group {group!r}; give each "
                              "destination a repo or branch of its own")


def first_overlap(folder: Path, named: list[tuple[str, Path]]) -> tuple[str, Path] | None:
    """The first (name, folder) of ``named`` whose folder holds, or lies in, ``folder``."""
    return next(((name, other) for name, other in named if overlap(folder, other)), None)


def _check_destination_folder(folder: Path, watched: list[tuple[str, Path]], published: list[tuple[str, Path]],
                              field: str) -> None:
    """A destination folder must not overlap (hold, or lie in) a watched folder, which would
    feed each merge back into the next one as an adapter, nor another destination folder,
    whose publishes would remove each other's staging copies and versions."""
    if (source := first_overlap(folder, watched)) is not None:
        raise ConfigError(f"{field}: {folder} overlaps the folder {source[1]} that source {source[0]!r} watches; "
                          "the daemon would register its own merges as adapters")
    if (group := first_overlap(folder, published)) is not None:
        raise ConfigError(f"{field}: {folder} overlaps the destination {group[1]} of group {group[0]!r}; "
                          "give each destination a folder of its own")
