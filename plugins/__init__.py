"""Built-in plugins. Installed as ``iteris_daemon.plugins`` and registered through the
``iteris_daemon`` entry-point group, exactly like a third-party plugin package."""
