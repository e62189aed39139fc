"""The parser's parts shared by every command group: --config and --debug everywhere."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

EXIT_CONFIG = 2


def common_options(config: Any, debug: Any) -> argparse.ArgumentParser:
    """--config and --debug, new for each parser (parents share their action objects)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", type=Path, default=config,
                        help="TOML config file (or $SECONDREADER_CONFIG)")  # fmt: skip
    common.add_argument("--debug", action="store_true", default=debug,
                        help="log at DEBUG, and show the traceback of any error")  # fmt: skip
    return common


class Subparsers:
    """add_subparsers whose every parser, nested ones too, takes --config and --debug.

    Their defaults are SUPPRESS: given after the command they count, and
    otherwise the value before the command (or its default) stays.
    """

    def __init__(self, action: Any) -> None:
        self.action = action

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        common = common_options(argparse.SUPPRESS, argparse.SUPPRESS)
        parser = self.action.add_parser(name, parents=[common], **kwargs)
        original = parser.add_subparsers

        def add_subparsers(**kw: Any) -> Subparsers:
            return Subparsers(original(**kw))

        parser.add_subparsers = add_subparsers
        return parser

