"""The ``facecluster`` console script: ``facecluster pack SRC OUT`` (more subcommands later).

Training and evaluation have their own entry points, ``train.py`` and ``evaluate.py``.
"""

from __future__ import annotations

import sys

COMMANDS = {"pack": "facecluster.data.pack"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: facecluster {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
