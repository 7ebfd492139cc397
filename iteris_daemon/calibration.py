"""Unlabelled calibration inputs: JSON Lines with, per line, a ``"text"``, an optional
``"text_pair"`` (the second segment of a sentence-pair task, NLI or paraphrase: tokenized as
``tokenizer(text, text_pair)``, as a pair classifier reads it, ``[CLS] a [SEP] b [SEP]`` with
token type ids 0 then 1) and an optional ``"target"`` (decoder text for encoder-decoder
teacher forcing; with a pair, the encoder reads the pair and the decoder the target), or a
conversation, ``"messages"``: ``[{"role": ..., "content": ...}, ...]``, which the merge
renders with the base model's chat template (the adapter of a chat model was trained on
templated text; a conversation takes no ``"text_pair"``)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ValidationError

from . import safe_json
from .errors import CalibrationError, ConfigError, IterisError, first_line
from .strict import PLUGIN_SETTINGS

CALIBRATION_NAME = "calibration.jsonl"

log = logging.getLogger(__name__)
T = TypeVar("T")


Messages = tuple[tuple[str, str], ...]  # ((role, content), ...)


@dataclass(frozen=True)
class Sample:
    text: str
    target: str | None = None
    # A conversation. ``text`` is then its plain rendering ("role: content" lines): what
    # a base model without a chat template reads, and what sorting and reports see.
    messages: Messages | None = None
    text_pair: str | None = None  # the second segment of a sentence pair (never with messages)

    @classmethod
    def conversation(cls, messages: Messages) -> "Sample":
        return cls("\n".join(f"{role}: {content}" for role, content in messages), None, tuple(messages))

    def to_json(self) -> list:
        """For worker job files and the fingerprint: ``[text, target]``, ``[text, target,
        [[role, content], ...]]`` or ``[text, target, None, text_pair]`` (a sample without a
        pair keeps the form, and the fingerprint, it had before pairs were read)."""
        if self.text_pair is not None:
            return [self.text, self.target, None, self.text_pair]
        return [self.text, self.target] if self.messages is None else [self.text, self.target, self.messages]

    @classmethod
    def from_json(cls, value: list) -> "Sample":
        text, target, *rest = value
        messages = tuple((role, content) for role, content in rest[0]) if rest and rest[0] is not None else None
        return cls(text, target, messages, rest[1] if len(rest) > 1 else None)


@dataclass(frozen=True)
class CalibrationSet:
    """The inputs for one adapter, and where they came from (shown in the merge report)."""

    samples: tuple[Sample, ...]
    source: str
    generated: bool = False  # made up by a data-free fallback, not real task inputs

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for sample in self.samples:
            digest.update(json.dumps(sample.to_json()).encode())
        return digest.hexdigest()

    def head(self, n: int | None) -> "CalibrationSet":
        return self if n is None else CalibrationSet(self.samples[:n], self.source, self.generated)

    def split(self, fraction: float, rng: random.Random, needed_by: str) -> tuple["CalibrationSet", "CalibrationSet"]:
        """``(kept, held out)``: a seeded random ``fraction`` of the samples held out, at least one
        each side (files are often sorted, by label or source, so not simply the last ones).
        ``needed_by`` names the setting that asked, for the error when there are too few."""
        n = len(self.samples)
        if n < 2:
            raise CalibrationError(self.source, f"{needed_by} needs at least 2 calibration samples, got {n}")
        held = set(rng.sample(range(n), min(n - 1, max(1, round(fraction * n)))))

        def part(out: bool) -> CalibrationSet:
            return CalibrationSet(tuple(s for i, s in enumerate(self.samples) if (i in held) == out), self.source,
                                  self.generated)

        return part(False), part(True)


def read_jsonl(path: str | Path, limit: int | None = None) -> CalibrationSet:
    """Parse a calibration file; errors name the file and the 1-based line. ``limit``: stop
    after that many samples (a merge takes the first ``samples_per_task``), so neither the
    rest of a large file nor a fault in it is read."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(path, "calibration file is a folder, not a file" if path.is_dir()
                               else "calibration file is not a regular file" if path.exists()
                               else "calibration file is a symlink to nothing (or a loop)" if path.is_symlink()
                               else "calibration file does not exist")
    samples: list[Sample] = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if limit is not None and len(samples) >= limit:
                break
            if not raw.strip():
                continue
            try:  # a byte order mark, as some editors write, is not part of the first line
                record = safe_json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
            except ValueError as exc:  # not UTF-8, not JSON, nested too deep
                raise CalibrationError(path, f"not valid JSON ({exc})", line=number) from None
            if not isinstance(record, dict):
                raise CalibrationError(path, "each line must be a JSON object", line=number)
            if "messages" in record:
                sample = Sample.conversation(_messages(record, path, number))
            else:
                sample = Sample(record.get("text"), record.get("target"), text_pair=record.get("text_pair"))
            if problem := sample_problem(sample):
                raise CalibrationError(path, problem, line=number)
            samples.append(sample)
    if not samples:
        raise CalibrationError(path, "calibration set is empty")
    # The report is read from anywhere: absolute, links kept (the daemon names a snapshot's file
    # by the adapter's own, replacing the snapshot's path, which a resolved link no longer holds)
    return CalibrationSet(tuple(samples), source=os.path.abspath(path))


def _not_unicode(sample: Sample) -> bool:
    """JSON's ``\\ud800`` escapes decode to lone surrogates, which no tokenizer takes."""
    strings = [sample.text, sample.target, sample.text_pair, *(content for _, content in sample.messages or ())]
    try:
        for string in strings:
            (string or "").encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _messages(record: dict, path: Path, line: int) -> Messages:
    """A line's conversation: a non-empty list of {"role": str, "content": str}. Beside it, a
    "text", "text_pair" or "target" is refused, even null (which would the merge read?); other
    fields are ignored, as on a "text" line: exports of chat data sets carry "prompt_id", "id",
    "prompt" or "category" on every line, and were refused whole. :func:`sample_problem`
    checks the rest, as for a plugin's."""
    if clashing := [key for key in ("text", "text_pair", "target") if key in record]:
        raise CalibrationError(path, _CONVERSATION_TAKES_NO.format(clashing[0]), line=line)
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise CalibrationError(path, '"messages" must be a non-empty list', line=line)
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
            raise CalibrationError(path, f'messages[{i}] must have string "role" and "content"', line=line)
        out.append((message["role"], message["content"]))
    return tuple(out)


_CONVERSATION_TAKES_NO = ('a "messages" sample takes no "{}": the conversation is the whole sample (a reply to '
                          "learn from goes in it, as its last message)")


def sample_problem(sample: Sample) -> str | None:
    """What is wrong with ``sample``: one rule for a file's line and a plugin source's answer."""
    if sample.messages is not None:
        if not (isinstance(sample.messages, (tuple, list)) and sample.messages and all(
                isinstance(m, (tuple, list)) and len(m) == 2 and all(isinstance(part, str) for part in m)
                for m in sample.messages)):
            return '"messages" must be a non-empty list of (role, content) strings'
        if clashing := [key for key in ("text_pair", "target") if getattr(sample, key) is not None]:
            return _CONVERSATION_TAKES_NO.format(clashing[0])
        if not any(content.strip() for _, content in sample.messages):
            return '"messages" has no content'
        if not isinstance(sample.text, str) or not sample.text.strip():
            return 'a "messages" sample needs its plain rendering as "text" (Sample.conversation makes both)'
    if not isinstance(sample.text, str) or not sample.text.strip():
        return 'missing or empty "text" string (or a "messages" list)'
    if not isinstance(sample.target, (str, type(None))):
        return '"target" must be a string'
    if sample.text_pair is not None and (not isinstance(sample.text_pair, str) or not sample.text_pair.strip()):
        return '"text_pair" must be a non-empty string (the second segment of a sentence pair)'
    if _not_unicode(sample):
        return "holds an unpaired surrogate escape (such as \\ud800): not Unicode text"
    return None


def write_jsonl(path: str | Path, samples: list[Sample] | tuple[Sample, ...]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for sample in samples:
            if sample.messages is not None:
                record = {"messages": [{"role": role, "content": content} for role, content in sample.messages]}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                continue
            record = {"text": sample.text}
            if sample.text_pair is not None:
                record["text_pair"] = sample.text_pair
            if sample.target is not None:
                record["target"] = sample.target
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


DEFAULT_ORDER = ("files", "adapter", "hub_dataset")


@dataclass
class CalibrationOptions:
    """What calibration sources may use; each source reads the part it understands.

    ``order`` names the sources to ask, first match wins. A data-free fallback
    (``generate``) is only asked when listed: merging on made-up inputs must be a choice.
    """

    order: tuple[str, ...] = DEFAULT_ORDER
    files: dict[str, Path] = field(default_factory=dict)  # adapter name -> JSON Lines file
    base_model: str | None = None
    samples: int = 50  # how many samples a generating source should make
    limit: int | None = None  # the merge takes the first ``limit`` samples: a reader may stop there (None: all)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # source name -> its settings
    max_download_bytes: int | None = None  # a downloaded calibration file's limit (the daemon's max_calibration_bytes)
    # The daemon's cache folder ([daemon] cache_dir): a source that downloads keeps its files in
    # a folder of its own there (None: the default cache folder, see iteris_daemon.paths.cache_dir).
    cache_dir: Path | None = None
    # Where a source that runs the model (``generate``) loads it: merge's --device, --dtype (None:
    # the checkpoint's) and --trust-remote-code; the daemon's calibration workers use the CPU.
    device: str = "cpu"
    dtype: str | None = None
    trust_remote_code: bool = False
    # A stop asked for (the daemon's, a worker's SIGTERM): a source that works long on one
    # adapter (``generate`` sampling a large base) checks it between batches and raises
    # MergeCancelled, so that it is released (its offload folder deleted) before the grace ends.
    should_stop: Callable[[], bool] = field(default=lambda: False, compare=False, repr=False)


class CalibrationSettings(BaseModel):
    """Base of a calibration source's optional ``Settings`` model: its table in the config,
    ``[groups.calibration.<name>]``. Unknown keys are an error. A source that declares one
    has its table checked when the config is read, not at the first merge hours later; one
    that does not takes no settings (:func:`checked_table`). Validated as
    :data:`~iteris_daemon.strict.PLUGIN_SETTINGS` says."""

    model_config = PLUGIN_SETTINGS


def source_settings(source: CalibrationSource, table: dict[str, Any]) -> CalibrationSettings:
    """``table`` validated by ``source.Settings``; a mistake is a ConfigError naming each field."""
    try:
        return source.Settings.model_validate(table)
    except ValidationError as exc:
        raise ConfigError.from_validation(f"calibration.{source.name}", exc) from None


def checked_table(source: CalibrationSource, table: dict[str, Any]) -> CalibrationSettings | None:
    """``table`` (a config's ``[groups.calibration.<name>]``, merge's ``--calibration-setting``)
    checked as ``source`` takes it: by its ``Settings``, or, without one, refused unless empty:
    the source reads no settings, so each key would be silently ignored."""
    if getattr(source, "Settings", None) is not None:
        return source_settings(source, table)
    if table:
        raise ConfigError(f"calibration.{source.name}: {', '.join(table)}: {no_settings(source.name)}")
    return None


def no_settings(name: str) -> str:
    """That a source without a ``Settings`` model takes none; for ``files``, where the adapter
    -> file mapping it reads goes instead (what a setting given it was most likely meant as)."""
    if name == "files":
        return ("'files' takes no settings: a file is mapped to an adapter with --adapter DIR=FILE.jsonl (merge, "
                'compare) or a daemon config\'s [groups.calibration] files = { ADAPTER = "FILE.jsonl" }')
    return f"{name!r} takes no settings"


@runtime_checkable
class CalibrationSource(Protocol):
    """Calibration data for adapters. Optional: ``description`` (one line), ``Settings`` (a
    :class:`CalibrationSettings` model of its config table; without one, it takes no
    settings), ``runs_in_worker`` and ``release()``.

    A source may keep state between the ``load`` calls of one run (``generate`` keeps the
    base model it loaded, which it would otherwise load again for every adapter) and free
    it in ``release()``: every caller calls it once it has asked the source about all
    adapters of a run, also after an error or a cancel, and before the merge loads its own
    base model. A ``load`` after it starts afresh.
    """

    name: ClassVar[str]

    def load(self, adapter: Any, options: CalibrationOptions) -> CalibrationSet | None:
        """Inputs for ``adapter``, or None to pass. ``adapter`` is a
        :class:`~iteris_daemon.lora.LoraAdapter` under ``merge`` and ``compare``, a
        :class:`~iteris_daemon.validation.AdapterLayout` (shapes, no tensors) in the daemon:
        both have ``name``, ``path``, ``config``, ``base_model`` and ``task_type``.

        Raise :class:`~iteris_daemon.errors.CalibrationError` when data exists but is
        malformed: silently passing would merge on the wrong data.
        """


def first_calibration(
    adapter, options: CalibrationOptions, available: dict[str, CalibrationSource]
) -> CalibrationSet | None:
    """The first answer of the sources in ``options.order`` with samples (None: none had any),
    each answer :func:`checked`. A source that raises something other than an IterisError
    (a plugin's store unreachable, say) is an error naming it."""
    for name in options.order:
        data = ask(name, available[name], adapter, options)
        if data is not None:
            return data
    return None


@contextmanager
def releasing(sources: Mapping[str, CalibrationSource]) -> Iterator[None]:
    """Ask ``sources`` (by name) within the block; on leaving it, however (an error, a cancel),
    call each one's ``release()`` where it has one, so a model a source kept is freed before
    the merge loads its own. A release that raises something other than an IterisError is a
    CalibrationError naming the source, raised once the others are released; where the block
    itself failed, it is logged and the block's own error goes on (a cancel stays a cancel)."""
    try:
        yield
    except BaseException:
        _release_all(sources, quiet=True)
        raise
    _release_all(sources, quiet=False)


def _release_all(sources: Mapping[str, CalibrationSource], quiet: bool) -> None:
    failed: IterisError | None = None
    for name, source in sources.items():
        if not hasattr(source, "release"):
            continue
        try:
            _from_plugin(name, "to release what it kept", source.release)
        except IterisError as error:
            if quiet:
                log.warning("%s", error)
            failed = failed or error
    if failed is not None and not quiet:
        raise failed


def held_after_release(answers: list[T | None], count: int, held: T) -> list[T | None]:
    """What ``count`` adapters get from a source whose ``release()`` failed after ``answers``:
    each it answered is held back with ``held`` (its line), one it had no data for stays None,
    for the next source to answer."""
    return [None if answer is None else held for answer in answers] + [held] * (count - len(answers))


def ask(name: str, source: CalibrationSource, adapter, options: CalibrationOptions) -> CalibrationSet | None:
    """Source ``name``'s answer for ``adapter``, :func:`checked`. Whatever it raises that is
    not an IterisError (a plugin's store unreachable, say) is a CalibrationError naming it,
    as everywhere a source is asked (``merge``, the daemon, a calibration worker)."""
    return _from_plugin(name, f"on adapter {adapter.name}",
                        lambda: checked(name, adapter.name, source.load(adapter, options)))


def _from_plugin(name: str, failed: str, call: Callable[[], T]) -> T:
    """``call()``'s result; what it raises that is not an IterisError (a plugin's failure) is
    one line naming source ``name`` and what ``failed``; -v shows the traceback."""
    try:
        return call()
    except IterisError:
        raise
    except (Exception, SystemExit) as exc:  # a SystemExit escaped the daemon's run, left running
        raise CalibrationError(name, f"calibration source failed {failed}: {type(exc).__name__}: {first_line(exc)}") from exc


def checked(source: str, adapter: str, data: Any) -> CalibrationSet | None:
    """Source ``source``'s answer for ``adapter`` as a merge takes it: a set of no samples is
    no answer, and anything but a CalibrationSet of Samples is an error naming the source. Its
    ``source`` is a string, a path (``os.PathLike``) taken as one: else the report failed to be
    written after the whole merge, and the daemon's run escaped, unrecorded."""
    if data is None:
        return None
    if not isinstance(data, CalibrationSet):
        raise CalibrationError(source, f"calibration source answered {type(data).__name__} for adapter "
                                       f"{adapter}, not a CalibrationSet of Samples")
    if not isinstance(data.samples, (tuple, list)):  # a generator was read once, by whichever check came first
        raise CalibrationError(source, f"calibration source answered a CalibrationSet for adapter {adapter} whose "
                                       f"samples are a {type(data.samples).__name__}, not a tuple or list")
    if wrong := next((s for s in data.samples if not isinstance(s, Sample)), None):
        raise CalibrationError(source, f"calibration source answered a CalibrationSet for adapter {adapter} holding "
                                       f"a {type(wrong).__name__}, not a Sample")
    if isinstance(data.source, os.PathLike):
        data = replace(data, source=str(data.source))
    if not isinstance(data.source, str):
        raise CalibrationError(source, f"calibration source answered a CalibrationSet for adapter {adapter} whose "
                                       f"source is {type(data.source).__name__}, not a string (or a path)")
    if not isinstance(data.generated, bool):
        raise CalibrationError(source, f"calibration source answered a CalibrationSet for adapter {adapter} whose "
                                       f"generated is {type(data.generated).__name__}, not a bool")
    for number, sample in enumerate(data.samples, start=1):  # what a file's line must hold, a plugin's sample too
        if problem := sample_problem(sample):
            raise CalibrationError(source, f"calibration source answered sample {number} for adapter {adapter}: "
                                           f"{problem}")
    return data if data.samples else None

