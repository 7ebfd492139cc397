"""Catalog migrations (Alembic), installed as ``iteris_daemon.migrations``.

They run programmatically (``iteris_daemon.catalog.db.upgrade``; ``iteris-daemon db
upgrade`` by hand). A new one: change ``iteris_daemon/catalog/models.py``, then
``python -m iteris_daemon.catalog.revision "what changed"`` writes the script here.
"""
