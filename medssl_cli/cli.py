"""The `medssl` command line. Thin: options -> recipe -> stage function.

Heavy imports (torch, mimeta) happen inside the command bodies, so `medssl --help` stays fast.
Every ``UserError`` ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from types import ModuleType

import typer
from rich.markup import escape

from medssl_cli import __version__
from medssl_cli.commands import data, demo, embed, evaluate, finetune, pretrain, report, tsne
from medssl_cli.console import console
from medssl_cli.errors import UserError
from medssl_cli.runtime.preempt import Interrupted

app = typer.Typer(
    name="medssl",
    help="Label-efficient medical image classification: Barlow Twins pretraining on MIMeta datasets, "
    "few-label fine-tuning, honest evaluation, t-SNE and reports.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data.app, name="data")
app.command("pretrain")(pretrain.pretrain)
app.command("finetune")(finetune.finetune)
app.command("evaluate")(evaluate.evaluate)
app.command("tsne")(tsne.tsne)
app.command("embed")(embed.embed)
app.command("report")(report.report)
app.command("demo")(demo.demo)


def _version(value: bool) -> None:
    if value:
        console.print(f"medssl {__version__}", soft_wrap=True)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version."
    ),
) -> None:
    """medssl: pretrain -> finetune -> evaluate -> tsne -> report."""


def _click_errors() -> ModuleType:
    """The exceptions module of the click that typer runs on: typer >= 0.29 carries its own copy
    (``typer._click``, whose errors are not ``click``'s); older typer uses ``click`` itself."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turn user errors into one line and exit code 2."""
    from medssl_cli.console import setup_logging

    setup_logging()
    errors = _click_errors()
    try:
        code = app(args=argv, standalone_mode=False, prog_name="medssl")
    except UserError as exc:
        console.print(f"[red]error:[/red] {escape(exc.line())}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except Interrupted as exc:  # graceful stop: checkpoint written, run marked interrupted
        console.print(f"[yellow]interrupted:[/yellow] {escape(str(exc))}", soft_wrap=True)
        sys.exit(128 + exc.signum if exc.signum else 130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:  # outside a training loop, or a second Ctrl-C: stop at once, no traceback
        console.print("Stopped (Ctrl-C). A run keeps its last committed checkpoint: continue with --resume.")
        sys.exit(130)
    except errors.ClickException as exc:  # unknown option, bad value, missing argument
        if isinstance(exc, getattr(errors, "NoArgsIsHelpError", ())):  # bare `medssl`: help was shown
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        where = f"; run '{ctx.command_path} --help' for the options" if ctx is not None else ""
        console.print(f"[red]error:[/red] {escape(exc.format_message().rstrip('.'))}{where}.", soft_wrap=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)  # standalone_mode=False returns typer.Exit codes


if __name__ == "__main__":
    main()
