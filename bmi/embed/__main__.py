"""python -m bmi.embed [--cflags] [--libs] [--pc]: how to build against libbmi."""
from __future__ import annotations

import argparse
import sys

from ..errors import BMIError
from . import cflags, libs, pkg_config


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bmi.embed", description=__doc__.split(":")[1].strip())
    parser.add_argument("--cflags", action="store_true", help="compiler flags (the directory of bmi.h)")
    parser.add_argument("--libs", action="store_true", help="linker flags, with run paths")
    parser.add_argument("--pc", action="store_true", help="the pkg-config file bmi.pc")
    args = parser.parse_args()
    if not (args.cflags or args.libs or args.pc):
        parser.print_usage(sys.stderr)
        return 2
    try:
        if args.pc:
            print(pkg_config(), end="")
        else:
            print(" ".join(f() for f, asked in ((cflags, args.cflags), (libs, args.libs)) if asked))
    except BMIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
