"""`--help` of every command and sub-command exits 0 and shows its options."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from helpers import cli
from mlx_train.cli.main import build_parser, main


def _commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [(None, parser)] + sorted(sub.choices.items())


@pytest.mark.parametrize("name, parser", _commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_help_exits_0_and_lists_every_option(name, parser):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(([name] if name else []) + ["--help"])
    assert done.value.code == 0
    text = out.getvalue()
    flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    assert flags, name
    for flag in flags:
        assert flag in text, f"{name}: {flag} missing from --help"


def test_help_of_the_installed_command():
    proc = cli("train", "--help", timeout=60)
    text = " ".join(proc.stdout.split())  # argparse wraps to the terminal's width
    assert proc.returncode == 0 and "--stall-timeout" in text and "adaptive" in text
    assert proc.stderr == ""
