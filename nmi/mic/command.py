"""``nmi mic [flags]``: parse, validate, configure logging, run the controller."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from ..config import ConfigError
from ..flags import compat_warnings, go_style
from ..loop import run_loop
from ..ops import logs
from .flags import COMPAT_FLAGS, build_parser, settings_from

log = logging.getLogger("nmi.mic")


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(go_style(list(argv)))
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        parser.error(str(exc))
    logs.setup(fmt=settings.log_format, verbosity=settings.verbosity)
    # azure-core logs every request at INFO: the controller's own lines say what matters.
    logging.getLogger("azure").setLevel(logging.WARNING)
    for line in compat_warnings(args, COMPAT_FLAGS):
        log.warning(line)
    from .app import Mic

    try:
        return run_loop(Mic(settings).run_until_signalled())
    except ConfigError as exc:  # the cloud configuration, read at start
        print(f"nmi mic: error: {exc}", file=sys.stderr)
        return 2
