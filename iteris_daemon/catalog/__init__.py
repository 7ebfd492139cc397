"""The adapter catalog: database models, migrations, and the operations on them."""

from .db import Catalog, CatalogError, default_url
from .models import Adapter, AdapterRevision, AdapterStatus, MergeGroup, MergeRun, Source, SourceKind

__all__ = [
    "Adapter", "AdapterRevision", "AdapterStatus", "Catalog", "CatalogError", "MergeGroup", "MergeRun",
    "Source", "SourceKind", "default_url",
]
