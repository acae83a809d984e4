"""How the ``constellation`` command reports failures: one message, the right exit code, no traceback.

* ``click`` usage errors (bad flag values, invalid configs): its message, exit code 2.
* Errors a user can act on (:data:`USER_ERRORS`: bad or missing inputs, held or conflicting outputs, a full
  disk): ``Error: <message>``, exit code 1.
* Ctrl-C: ``Interrupted``, exit code 130 (128 + SIGINT), like a shell.
* Anything else is a bug: ``Error: <type>: <message>`` and how to see the traceback, exit code 1.

``constellation --debug ...`` prints the traceback as well.
"""

from __future__ import annotations

import errno
import sys
import traceback

import click

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPT", "EXIT_USAGE", "ConstellationGroup", "describe_error", "set_debug"]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPT = 130

_state = {"debug": False}


def set_debug(flag: bool) -> None:
    _state["debug"] = bool(flag)


def _user_error_types() -> tuple[type[BaseException], ...]:
    from constellation_assets.catalog.tables import CatalogConfigError
    from constellation_assets.config import ConfigError
    from constellation_assets.io.lease import LeaseHeldError, LeaseLostError
    from constellation_assets.io.uri import DataAccessError
    from constellation_assets.provenance import RunConflictError
    from constellation_assets.sim.bank import CosmosBankError
    from constellation_assets.sim.injection import InjectionError

    return (
        InjectionError,
        RunConflictError,
        DataAccessError,
        CatalogConfigError,
        ConfigError,
        CosmosBankError,
        LeaseHeldError,
        LeaseLostError,
    )


_OS_HINTS = {
    errno.ENOSPC: ("no space left on the device", "free space or choose another output location"),
    errno.EDQUOT: ("disk quota exceeded", "free space or choose another output location"),
    errno.EROFS: ("read-only file system", "choose a writable location"),
    errno.EACCES: ("permission denied", "choose a location you can write (or fix its permissions)"),
    errno.EPERM: ("operation not permitted", "choose a location you can write (or fix its permissions)"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.EISDIR: ("is a directory", "give a file path"),
}


def describe_error(exc: BaseException) -> tuple[str, bool]:
    """(message, expected): ``expected`` is False for errors that indicate a bug (the traceback matters)."""
    try:
        user = _user_error_types()
    except Exception:  # noqa: BLE001 - an import failure must not hide the original error
        user = ()
    if user and isinstance(exc, user):
        return str(exc), True
    if isinstance(exc, OSError) and exc.errno in _OS_HINTS:
        what, fix = _OS_HINTS[exc.errno]
        where = exc.filename or "(unknown path)"
        return f"{where}: {what}. What to do: {fix}", True
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (
        f"{type(exc).__name__}: {msg} (unexpected; run `constellation --debug ...` to see the traceback)",
        False,
    )


class ConstellationGroup(click.Group):
    """A click group whose ``main`` turns every exception into one message and a conventional exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        self._main(args, prog_name, complete_var, **extra)

    def _main(self, args, prog_name, complete_var, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            exc.show()
            sys.exit(EXIT_USAGE)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt):
            click.echo("Interrupted", err=True)
            sys.exit(EXIT_INTERRUPT)
        except SystemExit:
            raise
        except Exception as exc:  # noqa: BLE001 - the one place that reports errors
            msg, _expected = describe_error(exc)
            if _state["debug"]:
                traceback.print_exception(exc, file=sys.stderr)
            click.echo(f"Error: {msg}", err=True)
            sys.exit(EXIT_ERROR)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)
