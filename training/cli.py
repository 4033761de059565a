"""The one command-line parser of the project: argparse with one-line errors and a hint for a mistyped flag.

Standard library only, so every entry point (the trainer's, serving's operator tools, the benchmarks)
imports it without importing anything else of the project.
"""

from __future__ import annotations

import argparse
import difflib
import re
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (argparse prints the whole usage first: 20+ lines for `make
    train`), with a hint for a mistyped flag: the closest one, or where on the command line a flag of
    another level (before or after the subcommand) goes. Every command line of the project uses it."""

    def error(self, message: str) -> NoReturn:
        hint = ""
        if match := re.match(r"unrecognized arguments: (-\S+)", message):
            flag = match[1].split("=")[0]
            own = {option for action in self._actions for option in action.option_strings}
            commands = {name: sub for action in self._actions if isinstance(action, argparse._SubParsersAction)
                        for name, sub in action.choices.items()}
            theirs = {option: name for name, sub in commands.items() for action in sub._actions
                      for option in action.option_strings}
            if flag in own and commands:
                hint = f" ({flag} goes before the command)"
            elif flag in theirs:
                hint = f" ({flag} goes after the command, e.g. `{theirs[flag]} {flag}`)"
            elif close := difflib.get_close_matches(flag, sorted(own | set(theirs)), n=1):
                hint = f" (did you mean {close[0]}?)"
        self.exit(2, f"{self.prog}: error: {message}{hint}; `{self.prog} --help` lists the options\n")
