"""The ``evit-deploy`` command line: the built-in commands (:mod:`evit_deploy.commands`)
and the targets' own, each shown one way (:func:`evit_deploy.console.show`); the entry point
turns every failure into a one-line message and an exit code.

The targets' commands are loaded only when one is called or the commands are listed.
"""

from __future__ import annotations

import inspect
import re
import signal
import sys
import warnings
from functools import lru_cache
from typing import Optional

import typer

from . import __version__
from .commands import BUILT_IN
from .errors import (EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, EvitError, is_out_of_memory,
                     named_first_line, out_of_memory)
from .fsutil import write_error
from .progress import catch_ctrl_c

_state = {"debug": False, "quiet": False}


class _Commands(typer.core.TyperGroup):
    """The built-in commands, then the targets' own, loaded only when one is called or the
    commands are listed (a built-in name wins: a plug-in cannot replace ``export``)."""

    def list_commands(self, ctx):
        return [*super().list_commands(ctx), *(n for n in _target_commands() if n not in self.commands)]

    def get_command(self, ctx, name):
        found = super().get_command(ctx, name)
        if found is None and name in _target_commands():
            single = typer.Typer(add_completion=False, rich_markup_mode="rich")
            add_command(single, _target_commands()[name], name=name,
                        json_help="Write the result to FILE ('-': stdout).")
            found = typer.main.get_command(single)
        return found


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="EfficientViT M0–M5 to ONNX, Core ML, TVM, OpenVINO, LiteRT and ExecuTorch, with proven parity.")


@lru_cache(maxsize=1)
def _target_commands() -> dict:
    """The command functions of the target plug-ins by name (TVM: ``tune``); the first
    target to declare a name has it."""
    from .targets import available_targets

    found = {}
    for cls in available_targets().values():
        for c in cls.commands():
            found.setdefault(c.name, c.function)
    return found


#: Command parameters that name a file the command writes.
OUTPUT_FILES = ("plot", "save_outputs")


def add_command(to: typer.Typer, function, *, name: str | None, json_help: str, **settings) -> None:
    """Add a command function to ``to`` (see :mod:`evit_deploy.commands`): its parameters,
    ``--json``, and the targets' short option flags if it takes ``shortcuts``; the
    keyword-only parameters filled in; the result shown (:func:`evit_deploy.console.show`)."""
    from .targets import option_shortcuts

    takes = inspect.signature(function).parameters
    shortcuts = {}
    extra = [inspect.Parameter("json_out", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[str],
                               default=typer.Option(None, "--json", help=json_help))]
    for flag, (target, option) in sorted(option_shortcuts().items()) if "shortcuts" in takes else ():
        key = "shortcut_" + re.sub(r"\W", "_", flag.lstrip("-"))
        shortcuts[key] = (target, option)
        extra.append(inspect.Parameter(key, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[str],
                                       default=typer.Option(None, flag, help=f"Same as -O {target}.{option}=VALUE.")))
    given = {"reporter": _reporter, "quiet": lambda: _state["quiet"]}

    def run(**kwargs):
        from .console import show
        from .fsutil import ensure_output_file

        json_out = kwargs.pop("json_out")
        # Files the command writes at the end: refused now, not after the work.
        for path in (json_out, *(kwargs.get(name) for name in OUTPUT_FILES)):
            if path is not None and str(path) != "-":
                ensure_output_file(path)
        values = {shortcuts[key]: kwargs.pop(key) for key in shortcuts}
        if "shortcuts" in takes:
            kwargs["shortcuts"] = {k: v for k, v in values.items() if v is not None}
        kwargs.update({k: make() for k, make in given.items() if k in takes})
        show(function(**kwargs), json_out)

    run.__signature__ = _signature(function, drop={"reporter", "quiet", "shortcuts"}, extra=extra)
    run.__doc__, run.__name__ = function.__doc__, function.__name__
    to.command(name=name, **settings)(run)


def _reporter():
    from .console import RichReporter
    return RichReporter(quiet=_state["quiet"])


def _signature(function, *, drop: set[str], extra: list):
    """``function``'s parameters with resolved annotations (Typer reads them), without
    those in ``drop``, and ``extra`` ones after them."""
    import typing

    hints = typing.get_type_hints(function)
    signature = inspect.signature(function)
    params = [p.replace(annotation=hints.get(p.name, p.annotation), kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
              for p in signature.parameters.values() if p.name not in drop]
    return signature.replace(parameters=params + extra, return_annotation=inspect.Signature.empty)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"evit-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings, errors and results."),
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    _state["debug"] = debug
    _state["quiet"] = quiet


for _function, _settings in BUILT_IN:
    add_command(app, _function, **_settings)


# -- entry point ---------------------------------------------------------------------------

def invoke(argv: list[str]) -> int:
    """Run the CLI on ``argv``; every failure becomes a one-line message and an exit code."""
    debug = "--debug" in argv
    if not debug:
        # Deprecation notices from inside torch/coremltools/TVM are not actionable here.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    command = typer.main.get_command(app)
    stopped_by: list[int] = []
    try:
        # Standalone mode: Typer prints usage errors itself and exits 2, and turns
        # Ctrl-C into exit code 130; our own errors propagate to the handlers below.
        with catch_ctrl_c() as stopped_by:
            command.main(args=argv, prog_name="evit-deploy", standalone_mode=True)
        return 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_INTERNAL)
        return _stopped(stopped_by, debug) if code == EXIT_INTERRUPTED else code
    except KeyboardInterrupt:
        return _stopped(stopped_by, debug)
    except EvitError as exc:
        _error(str(exc) or type(exc).__name__, debug)
        return exc.exit_code
    except Exception as exc:  # a bug: say so, briefly, unless --debug
        error = out_of_memory(exc) if is_out_of_memory(exc) else write_error(exc)
        if error is not None:
            _error(str(error), debug)
            return error.exit_code
        _error(f"internal error: {named_first_line(exc)} "
               f"(run with --debug for the traceback)", debug)
        return EXIT_INTERNAL


def main() -> None:
    sys.exit(invoke(sys.argv[1:]))


def _stopped(stopped_by: list[int], debug: bool) -> int:
    if signal.SIGTERM in stopped_by:
        _error("terminated (SIGTERM)", debug)
        return EXIT_TERMINATED
    _error("interrupted", debug)
    return EXIT_INTERRUPTED


def _error(message: str, debug: bool) -> None:
    if debug:
        import traceback
        traceback.print_exc()
    typer.echo(f"error: {message}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
