"""`python -m tests.shared.tiny_models KIND FOLDER`: build one tiny model into FOLDER (use it as MODEL_NAME)."""

from __future__ import annotations

import argparse
import sys

from tests.shared import tiny_models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.shared.tiny_models",
        description=tiny_models.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("kind", choices=sorted(tiny_models.BUILDERS), help="which architecture to build")
    parser.add_argument("out", help="folder to write the model to (use it as MODEL_NAME)")
    args = parser.parse_args(argv)
    path = tiny_models.build(args.kind, args.out)
    print(path.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
