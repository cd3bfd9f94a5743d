"""Smoke tests of every entry point: help texts, listings, and the pipeline's quick profile end to end."""

import json
import logging
import subprocess
import sys

import pytest

from models.hmst.facts import FactConfig, FactWorld
from orchestration.cli import build_parser, main

COMMANDS = [name for name in build_parser()._subparsers._group_actions[0].choices]


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "orchestration.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "pretrain" in out.stdout and "pipeline" in out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "usage: memtrain " + command in capsys.readouterr().out


def test_models_lists_every_preset_with_counts(capsys):
    assert main(["models", "--vocab-size", "512"]) == 0
    out = capsys.readouterr().out
    assert "tgsmn-dense-tiny" in out and "active/token" in out


def test_pipeline_quick_profile_writes_report_and_resumes(ray_session, tmp_path, caplog):
    argv = ["pipeline", "--quick", "--output", str(tmp_path), f"pretrain.data.cache_dir={tmp_path / 'shards'}",
            "pretrain.data.max_documents=400"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["pretrain"]["final_eval_loss"] < summary["pretrain"]["first_eval_loss"]
    assert (tmp_path / "report.md").read_text().startswith("# memtrain pipeline report")
    assert (tmp_path / "plots" / "pretrain_loss.png").stat().st_size > 1000
    semantic_facts = FactWorld(FactConfig(n_entities=30)).by_placement("semantic")  # the quick profile's world
    assert summary["memory"]["count"] == len(semantic_facts) and summary["memory"]["recall_at_1"] > 0.8
    assert {row["policy"] for row in summary["meta_eval"]} == {"learned", "all_on", "all_off", "retrieval_only",
                                                                 "random"}
    for png in ("memory_latency.png", "meta_returns.png", "thermo_returns.png"):
        assert (tmp_path / "plots" / png).stat().st_size > 1000
    with caplog.at_level(logging.INFO, logger="orchestration.pipeline"):
        assert main(argv) == 0  # a second run skips the finished pretraining stage
    assert "pretraining already finished at step 30" in caplog.text
    assert json.loads((tmp_path / "summary.json").read_text())["pretrain"] == summary["pretrain"]


def test_overrides_may_follow_options(capsys):
    # `rl train ENV --iterations N key=value`: the override after the option still reaches the config
    assert main(["rl", "train", "CartPole-v1", "--iterations", "1", "ppo.bogus=1"]) == 2
    assert "unknown config key 'ppo.bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pretrain", "--bogus"])
