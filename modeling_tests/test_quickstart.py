"""The README's main job: `nemotron3 quickstart` builds, generates, saves with remote code and reloads."""

from __future__ import annotations

import os

from transformers_nemotron3.cli import main


def test_quickstart_end_to_end(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    assert "[4/4]" in printed and "same tokens: True" in printed
    assert "modeling_nemotron3.py" in os.listdir(tmp_path / "qs")


def test_unknown_command_is_an_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_every_command_module_has_a_main():
    import importlib

    from transformers_nemotron3.cli import COMMANDS

    for name, (module, _) in COMMANDS.items():
        assert callable(importlib.import_module(module).main), name
