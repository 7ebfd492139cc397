"""A base model's layer shapes, kept in the catalog: computed the first time an adapter of
it is checked, read from the catalog after (:data:`~iteris_daemon.validation.ShapeSource`).

Computed once per (base model, adapter kind) ever, not per adapter: a scan of a thousand
adapters of one base model computes them once, a restarted daemon or a ``sources scan``
of its catalog not at all. The daemon computes them in a worker process (:func:`in_worker`),
``sources scan`` in its own. Shapes that could not be computed (a base model that cannot
be read) are not stored: they are asked again, as the base model may have become readable,
but not before :data:`FAILED_RETRY_SECONDS`. Asked again per adapter, an unreachable Hub
base cost a worker start and a 30 s timeout for each adapter of a scan (20 adapters: 11
minutes), at each scan.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ..errors import BaseModelError, IncompatibleAdaptersError
from ..shapes import BaseShapes
from ..supervisor import WorkerFailed, WorkerOptions, run_in_worker
from ..validation import AdapterLayout, ShapeSource, layout_key
from .db import Catalog
from .models import BaseModelShapes

log = logging.getLogger(__name__)
SHAPES_PREFIX = ".shapes-"  # a shapes worker's files, in the daemon's work folder
_ERRORS = {"BaseModelError": BaseModelError, "IncompatibleAdaptersError": IncompatibleAdaptersError}
FAILED_RETRY_SECONDS = 60.0  # a base model that could not be read is asked again after this long


class CatalogShapes:
    """Shapes cached in the catalog; missing ones computed by ``compute`` and stored."""

    def __init__(self, catalog: Catalog, compute: ShapeSource, clock: Callable[[], float] = time.monotonic):
        self.catalog, self.compute, self._clock = catalog, compute, clock
        self._known: dict[str, BaseShapes] = {}
        self._failed: dict[str, tuple[float, str]] = {}  # key -> when its base model could not be read, and why
        self._lock = threading.Lock()  # one computation at a time: concurrent scans of one base wait for its answer

    def __call__(self, base: str, layout: AdapterLayout, trust_remote_code: bool) -> BaseShapes:
        key = layout_key(base, layout, trust_remote_code)
        with self._lock:
            if key not in self._known:
                if (failed := self._failed.get(key)) and self._clock() - failed[0] < FAILED_RETRY_SECONDS:
                    raise BaseModelError(failed[1])
                try:
                    self._known[key] = self._stored(key) or self._computed(key, base, layout, trust_remote_code)
                except BaseModelError as exc:
                    self._failed[key] = (self._clock(), str(exc))
                    raise
                self._failed.pop(key, None)
            return self._known[key]

    def _stored(self, key: str) -> BaseShapes | None:
        with self.catalog.session() as session:
            return session.scalar(select(BaseModelShapes.shapes).where(BaseModelShapes.key == key))

    def _computed(self, key: str, base: str, layout: AdapterLayout, trust_remote_code: bool) -> BaseShapes:
        shapes = self.compute(base, layout, trust_remote_code)
        try:
            with self.catalog.session() as session:
                session.add(BaseModelShapes(key=key, base_model=base, shapes=shapes))
        except IntegrityError:  # another daemon sharing the catalog stored them first
            pass
        return shapes


def in_worker(work_dir: Path, options: Callable[[], WorkerOptions] = WorkerOptions) -> ShapeSource:
    """Shapes computed in a worker process (``work_dir`` holds its files): the daemon itself
    never builds a model, or runs a base model's own code. ``options()`` is asked at each
    worker's start: a reload's memory limit and grace reached the merge workers, not this one."""

    def compute(base: str, layout: AdapterLayout, trust_remote_code: bool) -> BaseShapes:
        log.info("computing the layer shapes of %s in a worker (once per base model and adapter kind)", base)
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=SHAPES_PREFIX, dir=work_dir) as folder:
            job = {"kind": "shapes", "base_model": base, "adapter": str(layout.path), "trust_remote_code": trust_remote_code}
            try:
                return run_in_worker(job, Path(folder), f"shapes of {base}", options=options())
            except WorkerFailed as exc:
                raise _ERRORS.get(exc.error_type, BaseModelError)(str(exc)) from None

    return compute
