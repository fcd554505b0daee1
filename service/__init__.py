"""ptserve: the serving runtime (settings, app, routes, batcher, cache, CLI)."""
