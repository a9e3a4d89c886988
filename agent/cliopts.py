"""Global command-line options, declared once and accepted before or after any subcommand.

Why: ``edge-agent --config F run`` (the git/docker/kubectl habit) and ``edge-agent
run --config F`` must mean the same, and so must ``edge-fleet models --config F list``
and ``edge-fleet models list --config F``. argparse alone gets this wrong: a
subparser parses into a fresh namespace and copies it over its parent's, so an option
declared on both levels with a real default resets what was given before the
subcommand. Here every copy of a global option has ``default=SUPPRESS`` (absent means
"not given at this level") and the real default is filled in once, after parsing.

Usage: build the whole parser tree as usual, then ``OPTIONS.install(parser)`` adds
each global option to the root and to every subparser at any depth (a subcommand
added later by someone else is covered without touching this module), and
``OPTIONS.parse(parser, argv)`` parses and fills the defaults. A subparser that
still declares a global option itself keeps its declaration, with the default
suppressed; one that uses the same flag for something else is a programming error
reported when the parser is built.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence


@dataclass(frozen=True)
class GlobalOption:
    """One option every command accepts: its flags, its default, and add_argument's other keywords."""

    flags: tuple[str, ...]
    default: Any = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        if "dest" in self.kwargs:
            return str(self.kwargs["dest"])
        long = [f for f in self.flags if f.startswith("--")] or list(self.flags)
        return long[0].lstrip("-").replace("-", "_")


def option(*flags: str, default: Any = None, **kwargs: Any) -> GlobalOption:
    """``option("--config", metavar="PATH", help=...)``: the add_argument spelling."""
    return GlobalOption(tuple(flags), default, dict(kwargs))


def walk(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parser and every subparser below it, each once (aliases share a parser)."""
    seen: set[int] = set()
    stack = [parser]
    while stack:
        p = stack.pop()
        if id(p) in seen:
            continue
        seen.add(id(p))
        yield p
        for action in p._actions:  # noqa: SLF001 - argparse has no public way to list subparsers
            if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
                stack.extend(reversed(list(action.choices.values())))


class GlobalOptions:
    def __init__(self, *options: GlobalOption) -> None:
        self.options = tuple(options)

    def install(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        for p in walk(parser):
            for opt in self.options:
                self._add(p, opt)
        return parser

    @staticmethod
    def _add(p: argparse.ArgumentParser, opt: GlobalOption) -> None:
        existing = [p._option_string_actions[f] for f in opt.flags if f in p._option_string_actions]  # noqa: SLF001
        for action in existing:
            if action.dest != opt.dest:
                raise ValueError(f"{p.prog}: {action.option_strings} is used for {action.dest!r}, "
                                 f"but {opt.flags} is a global option ({opt.dest!r})")
            action.default = argparse.SUPPRESS
        if not existing:
            p.add_argument(*opt.flags, default=argparse.SUPPRESS, **opt.kwargs)

    def fill_defaults(self, namespace: argparse.Namespace) -> argparse.Namespace:
        for opt in self.options:
            if not hasattr(namespace, opt.dest):
                setattr(namespace, opt.dest, opt.default)
        return namespace

    def parse(self, parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
        return self.fill_defaults(parser.parse_args(argv))


__all__ = ["GlobalOption", "GlobalOptions", "option", "walk"]
