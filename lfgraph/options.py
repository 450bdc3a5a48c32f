"""The ranges of lfgraph's numeric options, in one place, for the CLI and the Python API alike.

One rule per idea (a count of steps, of windows, a sequence length, a fraction, a tolerance),
used as an ``argparse`` ``type=`` by every subcommand and by :func:`check` in the API, so the
same idea is refused the same way everywhere (``compress --heal -5`` as ``heal --steps -3``).
NaN and infinities are never accepted. :class:`Parser` prints an option error as one line
and exits 2, like every other user error.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, NoReturn

from .errors import LfgraphError


@dataclass(frozen=True)
class Rule:
    """A numeric option's range: ``kind`` (int or float) and a test with its wording."""

    kind: type
    ok: Callable[[float], bool]
    wording: str

    def parse(self, text: str) -> Any:
        """``argparse`` type: the value, or ``ArgumentTypeError`` naming the range."""
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if self.kind is int else 'a number'}") from None
        if not self.valid(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {self.wording}")
        return value

    def valid(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and (not float(value).is_integer()):
            return False
        return math.isfinite(value) and self.ok(value)

    __call__ = parse  # argparse calls the type


STEPS = Rule(int, lambda v: v >= 0, "a number of steps >= 0 (0: off)")
EVERY = Rule(int, lambda v: v >= 0, "a step interval >= 0 (0: off)")
COUNT = Rule(int, lambda v: v >= 1, "a whole number >= 1")
OPTIONAL_COUNT = Rule(int, lambda v: v >= 0, "a whole number >= 0 (0: skip)")
SEQ_LEN = Rule(int, lambda v: v >= 2, "a number of tokens >= 2")
SEED = Rule(int, lambda v: 0 <= v < 2**63, "a whole number >= 0")
FRACTION = Rule(float, lambda v: 0.0 < v < 1.0, "a fraction strictly between 0 and 1 (e.g. 0.25)")
POSITIVE = Rule(float, lambda v: v > 0.0, "a finite number > 0")
NON_NEGATIVE = Rule(float, lambda v: v >= 0.0, "a finite number >= 0")
#: ``--warmup``: a fraction of the steps below 1, a step count from 1 on
WARMUP = Rule(float, lambda v: v >= 0.0, "a fraction of the steps (< 1) or a step count (>= 1), not negative")


def check(name: str, value: Any, rule: Rule) -> None:
    """Refuse ``value`` of the option ``name`` outside ``rule`` (API calls; the CLI parses
    with the rule itself). ``None`` means "not given" and passes."""
    if value is None:
        return
    if not rule.valid(value):
        raise LfgraphError(f"{name} {value} is out of range: give {rule.wording}")


def add_overwrite_option(p: argparse.ArgumentParser) -> None:
    """``--overwrite``: the same words for every subcommand that writes files."""
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs that exist and that lfgraph did not write (only the files lfgraph writes; "
                        "other files in an output folder stay)")


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``lfgraph: error: …``) and exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"lfgraph: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        """As argparse's, and an argument given as the empty string is an error: it names no
        file or folder (``MODEL ""``, ``-o ""``: ``Path("")`` is the current folder) and no value."""
        namespace, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            if getattr(namespace, action.dest, None) == "" and action.default != "":
                name = "/".join(action.option_strings) if action.option_strings else (action.metavar or action.dest).upper()
                self.error(f"{name} is empty: give it a value (a path, for a file or folder)")
        return namespace, extras
