"""Catalog migrations (Alembic), installed as ``iteris_daemon.migrations``.

The catalog arrives with the adapter-catalog work; this package exists so the
layout and the install mapping are in place from the start."""
