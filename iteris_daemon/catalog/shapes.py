"""The daemon's :data:`~iteris_daemon.validation.ShapeSource`: a base model's layer shapes
from the catalog, computed by a worker process the first time they are needed.

One worker per (base model, adapter kind) ever, not per adapter: a scan of a thousand
adapters of one base model starts one worker, and a restarted daemon none. Shapes
that could not be computed (a base model that cannot be read) are not cached: the
next adapter asks again, as the base model may have become readable.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ..errors import BaseModelError, IncompatibleAdaptersError
from ..shapes import BaseShapes
from ..supervisor import WorkerFailed, WorkerOptions, run_in_worker
from ..validation import AdapterLayout, layout_key
from .db import Catalog
from .models import BaseModelShapes

log = logging.getLogger(__name__)
SHAPES_PREFIX = ".shapes-"  # a shapes worker's files, in the daemon's work folder
_ERRORS = {"BaseModelError": BaseModelError, "IncompatibleAdaptersError": IncompatibleAdaptersError}


class CatalogShapes:
    """Shapes cached in the catalog; missing ones computed in a worker (``work_dir`` holds its files)."""

    def __init__(self, catalog: Catalog, work_dir: Path, options: WorkerOptions = WorkerOptions()):
        self.catalog, self.work_dir, self.options = catalog, Path(work_dir), options
        self._known: dict[str, BaseShapes] = {}
        self._lock = threading.Lock()  # one worker at a time: concurrent scans of one base wait for its answer

    def __call__(self, base: str, layout: AdapterLayout, trust_remote_code: bool) -> BaseShapes:
        key = layout_key(base, layout, trust_remote_code)
        with self._lock:
            if key not in self._known:
                self._known[key] = self._stored(key) or self._compute(key, base, layout, trust_remote_code)
            return self._known[key]

    def _stored(self, key: str) -> BaseShapes | None:
        with self.catalog.session() as session:
            return session.scalar(select(BaseModelShapes.shapes).where(BaseModelShapes.key == key))

    def _compute(self, key: str, base: str, layout: AdapterLayout, trust_remote_code: bool) -> BaseShapes:
        log.info("computing the layer shapes of %s in a worker (once per base model and adapter kind)", base)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=SHAPES_PREFIX, dir=self.work_dir) as folder:
            job = {"kind": "shapes", "base_model": base, "adapter": str(layout.path), "trust_remote_code": trust_remote_code}
            try:
                shapes = run_in_worker(job, Path(folder), f"shapes of {base}", options=self.options)
            except WorkerFailed as exc:
                raise _ERRORS.get(exc.error_type, BaseModelError)(str(exc)) from None
        try:
            with self.catalog.session() as session:
                session.add(BaseModelShapes(key=key, base_model=base, shapes=shapes))
        except IntegrityError:  # another daemon sharing the catalog stored them first
            pass
        return shapes
