"""User-facing errors and the command-line wrapper that prints them as one paragraph."""

from __future__ import annotations

import sys
import textwrap
from typing import Callable


class UserError(Exception):
    """Bad input: a missing file, a mismatched cache, a recipe typo. Printed without a traceback."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a command's `main`; a UserError becomes one readable paragraph on stderr and exit code 2."""
    try:
        return main(argv) or 0
    except UserError as err:
        prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "dist_distill"
        text = textwrap.fill(f"error: {err}", width=100, subsequent_indent="  ")
        print(f"{prog}: {text}", file=sys.stderr, flush=True)
        return 2
