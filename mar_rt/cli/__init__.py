"""The ``mar-rt`` command line (typer). Each sub-command lives in its own module here.

Nothing in the package imports ``mar_rt.cli``; heavy imports happen inside the commands.
"""

from __future__ import annotations

import logging

import typer

from mar_rt.cli import (
    batch,
    bench,
    doctor,
    engines,
    evaluate,
    import_cmd,
    node,
    run,
    simulate,
    train,
)

app = typer.Typer(
    name="mar-rt",
    help="CT metal artifact reduction (DuDoCROP): run, evaluate, train, build engines, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )


for _module in (run, evaluate, simulate, train, engines, bench, doctor, batch, node, import_cmd):
    _module.register(app)
