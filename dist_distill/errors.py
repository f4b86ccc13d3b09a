"""User-facing errors and the command-line wrapper that prints them as one paragraph."""

from __future__ import annotations

import os
import sys
import textwrap
from typing import Callable


class UserError(Exception):
    """Bad input: a missing file, a mismatched cache, a recipe typo. Printed without a traceback."""


def run_cli(main: Callable[[list[str] | None], int | None], prog: str, argv: list[str] | None = None) -> int:
    """Run a command's `main`; a UserError becomes one readable paragraph on stderr and exit code 2.
    (``DD_CHECK_DEVICES=1``: the device test mode of training.device_check, for tests.)"""
    if os.environ.get("DD_CHECK_DEVICES") == "1":
        from dist_distill.training.device_check import install

        install()
    try:
        return main(argv) or 0
    except UserError as err:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            prog += f" (rank {os.environ.get('RANK', '?')})"
        text = "\n".join(textwrap.fill(line, width=100, subsequent_indent="  ", break_long_words=False,
                                       break_on_hyphens=False)
                         for line in f"error: {err}".splitlines())
        print(f"{prog}: {text}", file=sys.stderr, flush=True)
        return 2
