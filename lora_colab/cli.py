"""The `lora-colab` command line."""

import argparse
import json
import sys

from . import __version__
from .errors import LoraColabError


def _cmd_inspect(args):
    from .checkpoint import open_checkpoint
    from .inspect_info import format_summary, summarize

    with open_checkpoint(args.path) as ckpt:
        summary = summarize(ckpt)
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print("\n".join(format_summary(summary)))
        if args.keys:
            for key in ckpt.keys():
                print(f"{key}\t{ckpt.st_dtype(key)}\t{list(ckpt.shape(key))}")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="lora-colab",
        description="Extract LoRAs from checkpoint pairs and resize LoRAs, in bounded memory.",
        epilog="Run 'lora-colab COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"lora-colab {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect", help="show tensors, dtypes, size, metadata and detected layout of a checkpoint",
        description="Summarise a .safetensors file, a sharded *.index.json or a diffusers folder "
                    "(reads the headers only).")
    inspect.add_argument("path", metavar="FILE_OR_FOLDER")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.add_argument("--keys", action="store_true", help="also list every tensor: name, dtype, shape")
    inspect.set_defaults(func=_cmd_inspect)
    return parser


def main(argv=None):
    """Entry point of `lora-colab` and `python -m lora_colab`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except LoraColabError as exc:
        print(f"lora-colab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lora-colab: interrupted; no partial output was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
