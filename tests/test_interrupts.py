"""Ctrl-C in every command: exit 130 (so `sae train && sae eval` stops) and a message of that command's own,
saying what it left. The real signal, through a subprocess, is tested in tests/test_train.py."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from sae_cache.sae_common.cli import main

STAGES = {  # command -> (module.function it runs, what the message says)
    "harvest": ("sae_cache.harvest.run.harvest", "sae harvest interrupted: every complete shard is kept; run the same "
                                                  "command again to resume"),
    "train": ("sae_cache.train.run.train", "sae train interrupted: its last checkpoint is kept; run the same command "
                                           "again to resume"),
    "eval": ("sae_cache.evaluate.run.evaluate", "sae eval interrupted: it writes its results only when it finishes"),
    "features": ("sae_cache.evaluate.features.features", "sae features interrupted: it writes its pages only when "
                                                         "its scan finishes"),
}


@pytest.mark.parametrize("command", STAGES)
def test_ctrl_c_exits_130_with_the_commands_own_message(command, monkeypatch):
    target, message = STAGES[command]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupted)
    result = CliRunner().invoke(main, [command])
    assert result.exit_code == 130, result.output
    assert message in result.output and "Traceback" not in result.output
    assert [c for c in STAGES if c != command and f"sae {c} " in result.output] == []


def test_a_message_the_interrupted_code_gives_is_the_one_printed(monkeypatch):
    from sae_cache.train.trainer import TrainingInterrupted

    def interrupted(*args, **kwargs):
        raise TrainingInterrupted("sae train interrupted at batch 7 of 9: checkpoint saved in r; run the same ...")

    monkeypatch.setattr("sae_cache.train.run.train", interrupted)
    result = CliRunner().invoke(main, ["train"])
    assert result.exit_code == 130 and result.output.strip() == ("sae train interrupted at batch 7 of 9: checkpoint "
                                                                 "saved in r; run the same ...")
