"""The ``constellation`` command.

Sub-commands live in the modules of this package: every module that defines ``register(main)`` adds its
commands to the group (``constellation --help`` lists them). They call the same domain functions as the
Dagster assets.

Errors: every failure a user can cause or fix (bad input, missing data, a full disk, a held output) is printed
as one message, ``Error: what, which input, what to do``, without a traceback (``--debug`` shows it). Exit
codes: 0 success, 1 error, 2 usage (bad flags, invalid config), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import importlib
import json
import logging
import pkgutil
import sys

import click

from constellation_assets import __version__
from constellation_assets.cli.errors import ConstellationGroup, set_debug
from constellation_assets.config import ConfigError, load_config

__all__ = ["config_options", "load_cli_config", "main"]


@click.group(
    cls=ConstellationGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.version_option(__version__, prog_name="constellation")
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
@click.option("--debug", is_flag=True, help="show the traceback of an error (and debug logging)")
def main(verbose: bool, debug: bool) -> None:
    """Constellation: Euclid weak-lensing shear catalog and reproducible lens-injection simulations."""
    from rich.logging import RichHandler

    set_debug(debug)
    verbose = verbose or debug

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, console=_stderr_console())],
        force=True,
    )


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def load_cli_config(config_path: str | None, flags: dict | None = None):
    """Load the config like ``load_config`` but turn config errors into a clean CLI error (exit code 2)."""
    from constellation_assets.io.uri import is_s3

    try:
        return load_config(config_path, {k: v for k, v in (flags or {}).items() if v is not None})
    except ConfigError as exc:
        msg = str(exc)
        if config_path and is_s3(str(config_path)) and msg.startswith("Cannot read config"):
            # the config's own data.s3 settings are not known before it is read: only the environment applies
            msg += (
                " An s3:// --config is read with the AWS_* environment only: set AWS_ENDPOINT_URL for an "
                "S3-compatible store (and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), or copy the file locally."
            )
        raise click.UsageError(msg) from None


def config_option(f):
    return click.option(
        "--config",
        "config_path",
        default=None,
        metavar="PATH|s3://",
        help="YAML/JSON config (local path or s3://). Values in it override command-line flags.",
    )(f)


config_options = config_option


@main.group("config")
def config_group() -> None:
    """Inspect configs."""


@config_group.command("show")
@config_option
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="override any key (YAML value)")
@click.option("--variant", default=None)
@click.option("--experiment-id", default=None)
@click.option("--source-mode", type=click.Choice(["sersic", "cosmos"]), default=None)
@click.option("--cosmos-bank-h5", default=None)
@click.option("--seed-base", type=int, default=None)
def config_show(config_path, sets, **flags) -> None:
    """Print the effective config as JSON (defaults < flags < values in --config)."""
    import yaml

    for item in sets:
        if "=" not in item:
            raise click.BadParameter(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        flags[k] = yaml.safe_load(v)
    cfg = load_cli_config(config_path, flags)
    click.echo(json.dumps(cfg.to_dict(), indent=2))


def _register_all() -> None:
    pkg = sys.modules[__name__]
    for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{mod.name}")
        register = getattr(module, "register", None)
        if callable(register):
            register(main)


_register_all()
