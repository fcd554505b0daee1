"""``serve --frontends N``: N HTTP front-end processes feed one engine process.

The engine process runs the whole app (backbone, device pool, batcher, caches, watcher) on a private
unix socket, plus a ZeroMQ endpoint for classification rows already tokenised. Front ends answer
``/v1/classify`` themselves (auth, limits, validation, tokenising, the JSON response) and hand every
other route to the engine's app unchanged, so uploads, rollbacks, deletes and jobs change the engine's
caches exactly as they do in one process. See supervisor.py for the processes and their lifecycle.
"""
