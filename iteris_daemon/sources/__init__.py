"""Where adapters come from: local folders (watchdog events) and Hub repositories (polling)."""
