"""Smoke tests of every entry point: help texts, listings, and the pipeline's quick profile end to end."""

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from models.hmst.facts import FactConfig, FactWorld
from orchestration.cli import build_parser, main
from orchestration.storage import Location

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
    from orchestration.pipeline import _meta_env_config, PipelineConfig
    from rl.envs import make_env
    from rl.envs.meta import baseline_policies
    from rl.evaluate import run_episodes

    argv = ["pipeline", "--quick", "--output", str(tmp_path), f"pretrain.data.cache_dir={tmp_path / 'shards'}",
            "pretrain.data.max_documents=400"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["pretrain"]["final_eval_loss"] < summary["pretrain"]["first_eval_loss"]
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# memtrain pipeline report") and "Quick profile: a smoke run" in report
    assert (tmp_path / "plots" / "pretrain_loss.png").stat().st_size > 1000
    semantic_facts = FactWorld(FactConfig(n_entities=30)).by_placement("semantic")  # the quick profile's world
    assert summary["memory"]["count"] == len(semantic_facts) and summary["memory"]["recall_at_1"] > 0.8
    for row in summary["retrieval"]:  # exact match over every semantic question, inside its own interval
        assert row["questions"] == len(semantic_facts) and row["low"] <= row["exact_match"] <= row["high"]

    # the meta comparison: an episode re-run outside the pipeline scores what the table says, and the paired
    # differences are those of the per-seed returns
    rows = {r["policy"]: r for r in summary["meta_eval"]}
    assert set(rows) == {"learned", "all_on", "all_off", "retrieval_only", "semantic_exit", "random"}
    best = rows[summary["meta_best_fixed"]]
    assert best["return_mean"] == max(r["return_mean"] for name, r in rows.items() if name not in ("learned", "random"))
    for row in rows.values():
        paired = np.mean(np.subtract(row["per_seed"], best["per_seed"]))
        assert row["diff"] == pytest.approx(paired) and row["return_mean"] == pytest.approx(np.mean(row["per_seed"]))
    env_config = {**_meta_env_config(PipelineConfig(output=str(tmp_path), facts=FactConfig(n_entities=30)),
                                     Location(str(tmp_path))), "queries": 4, "entities": "heldout"}
    env = make_env("meta", {**env_config, "seed": 1000})
    again = run_episodes(env, baseline_policies(env_config)["all_off"], seed=1000, episodes=1)
    assert again["return"] == pytest.approx(rows["all_off"]["per_seed"][0])

    thermo = {r["policy"]: r for r in summary["thermo_eval"]}
    best_name = f"best fixed ({summary['thermo_best_fixed']})"
    assert set(thermo) == {"learned", best_name, "source-default"}
    assert summary["thermo_best_fixed"] == summary["thermo_grid"][0]["policy"]  # chosen on the training streams
    assert thermo["learned"]["diff"] == pytest.approx(np.mean(np.subtract(thermo["learned"]["per_seed"],
                                                                          thermo[best_name]["per_seed"])))
    for png in ("plots/memory_latency.png", "plots/meta_returns.png", "plots/thermo_returns.png",
                "plots/retrieval.png", "meta-eval/comparison.png", "thermo-eval/comparison.png"):
        assert (tmp_path / png).stat().st_size > 1000
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
