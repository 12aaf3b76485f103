"""Command line: ``python -m service [--config FILE]`` (or the ``relay`` script)."""

from __future__ import annotations

import argparse
import gc
import logging
import sys

from . import __version__
from .config import CONFIG_ENV_VAR, ConfigError, config_path, deprecations, load_settings
from .telemetry.logs import configure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="relay", description="Observable HTTP reverse proxy.")
    parser.add_argument(
        "--config",
        help=f"YAML config file (default: ${CONFIG_ENV_VAR}, else the built-in demo config)",
    )
    parser.add_argument(
        "--check-config", action="store_true", help="validate the config, print it and exit"
    )
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    args = parser.parse_args(argv)
    from .app import check_tls_files, load_app_hook  # not needed for --help or --version

    config_file = config_path(args.config)
    gc.disable()  # what the config is read into lives for good (server/serve.py, tune_gc)
    try:
        settings = load_settings(config_file)
        check_tls_files(settings)  # a bad certificate or key file stops the start, named
        load_app_hook(settings.server.app_hook)  # a broken hook stops the start, named
    except ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        gc.enable()
    if args.check_config:
        print(settings.model_dump_json(indent=2))
        return
    configure(settings.log)
    for warning in deprecations(settings):
        logging.getLogger("relay").warning(warning)
    from .server.workers import run

    run(settings, config_file)


if __name__ == "__main__":
    main()
