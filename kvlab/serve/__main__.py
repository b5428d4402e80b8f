"""`python -m kvlab.serve [flags]`: the same as `kvlab serve [flags]`."""

import argparse
import sys

from kvlab.serve.cli import add_serve_arguments, cmd_serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvlab.serve",
                                     description="An OpenAI-compatible HTTP server around kvlab's engine.")
    add_serve_arguments(parser)
    return cmd_serve(parser.parse_args(argv), parser)


if __name__ == "__main__":
    sys.exit(main())
