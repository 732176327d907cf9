"""`python -m jdm_train.bench NAME [ARGS...]` runs `jdm_train.bench.NAME.main(ARGS)`."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import jdm_train.bench as _pkg


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(_pkg.__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m jdm_train.bench {{{','.join(names)}}} [args]")
        return 0 if argv else 2
    if argv[0] not in names:
        print(f"unknown benchmark {argv[0]!r}; expected one of: {', '.join(names)}", file=sys.stderr)
        return 2
    return importlib.import_module(f"jdm_train.bench.{argv[0]}").main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
