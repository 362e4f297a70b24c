"""The commands' flag parser: a flag given twice is never "the last one wins" without a word.

argparse keeps the last value of a repeated flag, so `ringpatch eval --model A --model B`
evaluated B alone. Here a flag that takes a list (nargs "+" or "*") gathers every occurrence
(`--model A --model B` is [A, B]); any other flag given twice is an error naming it. Every command
(`ringpatch train | eval | prepare | plan | recipe | report | corpus`) builds its parser from this.
"""

from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, as every refusal of the commands: what was wrong and where the flags are listed
        (argparse prints its whole usage first)."""
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")

    def add_argument(self, *args, **kwargs):
        if kwargs.get("nargs") in ("+", "*") and kwargs.get("action") in (None, "store"):
            kwargs["action"] = "extend"  # every occurrence, in order
        return super().add_argument(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        import sys

        given = list(sys.argv[1:] if args is None else args)
        seen: dict[str, str] = {}
        for token in given:
            if token == "--":
                break
            if not token.startswith("-") or token.lstrip("-").replace(".", "").isdigit():
                continue
            action = self._option_string_actions.get(token.split("=", 1)[0])
            if action is None or action.nargs in ("+", "*") or isinstance(action, argparse._HelpAction):
                continue
            if action.dest in seen:
                self.error(f"{seen[action.dest]} is given twice ({token.split('=', 1)[0]} again); give it once")
            seen[action.dest] = token.split("=", 1)[0]
        return super().parse_known_args(args, namespace)
