"""argparse options generated from the config dataclasses' field metadata (see config.knob).

A field with a "flag" becomes an option: its type comes from the annotation, its choices, metavar
and parser from the metadata, its help from the help text plus the default. Every option defaults
to None, meaning "not given", so that only what the user typed overrides the config file.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

from mlx_train.config import flagged_fields
from mlx_train.errors import UserError



def _dest(path: Tuple[str, ...]) -> str:
    return "cfg:" + ".".join(path)


def _type(f: dataclasses.Field, base: Any):
    parse = f.metadata.get("parse")
    if parse is None:
        return base

    def convert(text: str):
        try:
            return parse(text)
        except UserError as exc:  # argparse reports ArgumentTypeError as its own one-line error
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = base.__name__
    return convert


def _help(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if default is None or f.metadata.get("store_false") or "(default" in text:
        return text
    if isinstance(default, bool):
        return text if not default else f"{text} (default: on)"
    return f"{text} (default: {default})"


def add_options(parser: argparse.ArgumentParser, cls, title: Optional[str] = None,
                only: Optional[set] = None) -> None:
    """Add `cls`'s flagged fields to `parser` (one group per nested section), or only those whose flag
    is in `only` (a command that takes a few of the knobs, as check-network takes --backend)."""
    unknown = (only or set()) - {f.metadata["flag"] for _, f, _ in flagged_fields(cls)}
    assert not unknown, f"{cls.__name__} has no knob for {sorted(unknown)}"
    groups: Dict[str, Any] = {}
    sections = {f.name: f.metadata.get("help") or f.name for f in dataclasses.fields(cls)}
    for path, f, base in flagged_fields(cls):
        flag = f.metadata["flag"]
        if only is not None and flag not in only:
            continue
        section = sections[path[0]] if len(path) > 1 else (title or cls.__name__)
        if section not in groups:
            groups[section] = parser.add_argument_group(section)
        kw: Dict[str, Any] = {"dest": _dest(path), "default": None, "help": _help(f)}
        if f.metadata.get("store_false"):
            kw.update(action="store_const", const=False)
        elif base is bool:
            kw.update(action="store_const", const=True)
        else:
            choices = f.metadata.get("choices")
            metavar = f.metadata.get("metavar") or (None if choices else flag.lstrip("-").upper().replace("-", "_"))
            kw.update(type=_type(f, base), choices=choices, metavar=metavar)
        groups[section].add_argument(flag, **kw)


def helps(parser: argparse.ArgumentParser, command: str) -> Dict[str, str]:
    """What `command --help` says of each of its options, by name (--batch-size as batch_size): for
    wrappers over the command line (tasks.py) that must not write the help again."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {(action.option_strings[0] if action.option_strings else action.dest).lstrip("-").replace("-", "_"):
            action.help for action in commands[command]._actions if action.help != argparse.SUPPRESS}


def given(a: argparse.Namespace, cls) -> dict:
    """The values the user gave for `cls`'s flags, nested like `cls.to_dict()` ({} when none)."""
    out: dict = {}
    for path, _, _ in flagged_fields(cls):
        value = getattr(a, _dest(path), None)
        if value is None:
            continue
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def build(a: argparse.Namespace, cls):
    """An instance of a flat options class (RunOptions) from the flags, defaults for the rest."""
    try:
        return cls(**given(a, cls))
    except ValueError as exc:
        raise UserError(f"{exc}: fix the value and run again") from None


# argparse types for the options that are not config fields (their errors are argparse's one line).

def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def output_file(*suffixes: str):
    """A file the command will write: its folder must exist and take a new file there (tried, and
    undone), and it must not be a folder; with `suffixes`, its name must end in one of them."""

    def check(text: str) -> str:
        path = Path(text)
        if suffixes and path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f"{text!r} must end in {' or '.join(suffixes)}")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a folder: name a file in it")
        existed = path.exists()
        try:
            with path.open("ab"):
                pass
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot write {text!r} ({exc.strerror or exc}): choose another "
                                             "place") from None
        finally:
            if not existed and path.is_file():
                path.unlink()
        return text

    check.__name__ = "file"
    return check
