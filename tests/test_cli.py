"""The command line's own flags: `opd --version` and help that a pip install can follow."""

from __future__ import annotations

import pytest

from opd.cli import main
from opd.version import __version__

VERBS = [["train"], ["grpo"], ["eval"], ["serve-teacher"], ["reproduce"], ["report"],
         ["diagnose"], ["cold-start"], ["select-prompts"], ["demo"], ["lab"], ["lab", "build"]]


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"opd {__version__}"


@pytest.mark.parametrize("verb", [[], *VERBS], ids=lambda verb: " ".join(verb) or "opd")
def test_help_names_no_file_a_pip_install_lacks(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*verb, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: opd" in text and "docs/" not in text and ".md#" not in text


def test_top_level_help_says_where_the_settings_are_described(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "opd VERB --help" in text and "opd train --help-config" in text
