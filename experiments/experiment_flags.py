"""
The experiments' command-line flags: generate.py's one-line Parser and typed, range-checked values for argparse's
type=, so every script reports a bad flag in one line, before it loads a model or writes a file.

    p = Parser(prog="bench.py", description=...)
    p.add_argument("--repeats", type=POSITIVE, default=11)
    p.add_argument("--salient", type=FRACTION, default=0.6)
    p.add_argument("--lengths", type=numbers(int, lambda x: x >= 1, "at least 1", "1024,4096"))
    p.add_argument("--tasks", type=names(("passkey", "lines", "ppl")))
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the flat core, one folder up

from generate import Parser, _number  # noqa: E402,F401  (Parser: the scripts' parser, re-exported)

number = _number
POSITIVE = _number(int, lambda x: x >= 1, "at least 1")
NONNEGATIVE = _number(int, lambda x: x >= 0, ">= 0")
FRACTION = _number(float, lambda x: 0 <= x <= 1, "a fraction in [0, 1]")


def BOOLEAN(text):
    """argparse type= for true/false (1/0, yes/no, on/off); anything else is an error, not False."""
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def numbers(kind, ok, what, example, count=None):
    """argparse type= for comma-separated numbers, each one as number(kind, ok, what) checks it; `count` fixes how
    many. An empty value is an error, not the default."""
    one = _number(kind, ok, what)

    def parse(text):
        parts = text.split(",")
        if not text.strip() or any(not x.strip() for x in parts) or (count and len(parts) != count):
            n = f"{count} " if count else ""
            raise argparse.ArgumentTypeError(f"{text!r}: give {n}comma-separated numbers, e.g. {example}")
        try:
            return [one(x.strip()) for x in parts]
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e} (in {text!r}; e.g. {example})") from None
    parse.__name__ = f"list of {kind.__name__}"
    return parse


def names(choices):
    """argparse type= for a comma list of names from `choices` (at least one)."""
    def parse(text):
        items = [x.strip() for x in text.split(",")]
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{','.join(bad) or repr(text)}: choose from {', '.join(choices)}")
        return items
    parse.__name__ = "list of names"
    return parse
