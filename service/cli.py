"""The ``ptserve`` command line. Every flag is also a setting (``PTSERVE_<NAME>`` in the environment)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from service.settings import Settings

# (flag, setting, type, help): only flags given on the command line override the environment.
SERVE_FLAGS: list[tuple[str, str, type, str]] = [
    ("--host", "host", str, "address to bind (PTSERVE_HOST)"),
    ("--port", "port", int, "port to bind (PTSERVE_PORT)"),
    ("--model", "model", str, "Hugging Face encoder directory (PTSERVE_MODEL); default: packaged MiniLM"),
    ("--store", "store", str, "prompt store directory or redis:// URL (PTSERVE_STORE)"),
    ("--device", "device", str, "auto, cpu, cuda or cuda:N (PTSERVE_DEVICE)"),
    ("--dtype", "dtype", str, "float32, float16 or bfloat16 (PTSERVE_DTYPE)"),
    ("--max-batch-size", "max_batch_size", int, "rows per forward pass (PTSERVE_MAX_BATCH_SIZE)"),
    ("--max-batch-tokens", "max_batch_tokens", int, "padded tokens per forward (PTSERVE_MAX_BATCH_TOKENS)"),
    ("--max-wait-ms", "max_wait_ms", float, "how long a batch waits to fill (PTSERVE_MAX_WAIT_MS)"),
    ("--cache-bytes", "cache_bytes", int, "device prompt-cache budget (PTSERVE_CACHE_BYTES)"),
    ("--log-level", "log_level", str, "debug, info, warning or error (PTSERVE_LOG_LEVEL)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service")
    for flag, dest, kind, text in SERVE_FLAGS:
        serve.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        dest: getattr(args, dest) for _, dest, _, _ in SERVE_FLAGS if getattr(args, dest) is not None
    }
    return Settings(**overrides)


def _setting_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        name = ".".join(str(x) for x in err["loc"])
        lines.append(f"  {name} (--{name.replace('_', '-')} / PTSERVE_{name.upper()}): {err['msg']}")
    return "\n".join(lines)


def serve(settings: Settings) -> None:
    import uvicorn

    from service.app import create_app

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"ptserve: invalid settings:\n{_setting_errors(exc)}", file=sys.stderr)
        return 2
    if args.command == "serve":
        serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
