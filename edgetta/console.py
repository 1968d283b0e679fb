"""How every edgetta command line ends: one line and exit 2 for bad input, quiet on a closed pipe.

Used by ``edgetta`` itself, the host toolchain's ``python -m edgetta_export.*`` and the benchmarks.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, NoReturn

from .errors import EdgettaError


def guarded(main: Callable[[], int]) -> int:
    """``main()``'s exit code; a missing file or an edgetta error is one line on stderr and 2, and
    a closed pipe (``| head``) ends the program quietly. Library code reports through
    ``logging``; its INFO lines go to stderr as plain text."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        code = main()
        sys.stdout.flush()
    except (EdgettaError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except BrokenPipeError:
        # the reader went away: point stdout at /dev/null so the interpreter's final flush is quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    return code


def run_cli(main: Callable[[], int]) -> NoReturn:
    sys.exit(guarded(main))
