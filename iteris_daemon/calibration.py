"""Unlabelled calibration inputs: JSON Lines with a ``"text"`` field per line and an
optional ``"target"`` (decoder text for encoder-decoder teacher forcing)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import CalibrationError

CALIBRATION_NAME = "calibration.jsonl"


@dataclass(frozen=True)
class Sample:
    text: str
    target: str | None = None


@dataclass(frozen=True)
class CalibrationSet:
    """The inputs for one adapter, and where they came from (shown in the merge report)."""

    samples: tuple[Sample, ...]
    source: str

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for sample in self.samples:
            digest.update(json.dumps([sample.text, sample.target]).encode())
        return digest.hexdigest()

    def head(self, n: int | None) -> "CalibrationSet":
        return self if n is None else CalibrationSet(self.samples[:n], self.source)


def read_jsonl(path: str | Path) -> CalibrationSet:
    """Parse a calibration file; errors name the file and the 1-based line."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(path, "calibration file does not exist")
    samples: list[Sample] = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CalibrationError(path, f"not valid JSON ({exc})", line=number) from None
            if not isinstance(record, dict):
                raise CalibrationError(path, "each line must be a JSON object", line=number)
            text = record.get("text")
            if not isinstance(text, str) or not text.strip():
                raise CalibrationError(path, 'missing or empty "text" string', line=number)
            target = record.get("target")
            if target is not None and not isinstance(target, str):
                raise CalibrationError(path, '"target" must be a string', line=number)
            samples.append(Sample(text=text, target=target))
    if not samples:
        raise CalibrationError(path, "calibration set is empty")
    return CalibrationSet(tuple(samples), source=str(path))


def write_jsonl(path: str | Path, samples: list[Sample] | tuple[Sample, ...]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for sample in samples:
            record = {"text": sample.text}
            if sample.target is not None:
                record["target"] = sample.target
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
