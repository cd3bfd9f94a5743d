"""Smoke tests of every entry point: help texts, exit codes and streams of the installed `memtrain`, listings, and
the pipeline's quick profile end to end."""

import argparse
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.hmst.facts import FactConfig, FactWorld
from orchestration.cli import build_parser, main
from orchestration.storage import Location

def all_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(words, parser) of every command and subcommand, e.g. (("memory", "add"), <its parser>)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,), sub
                yield from all_commands(sub, prefix + (name,))


def memtrain(cwd, *argv: str) -> subprocess.CompletedProcess:
    """The installed `memtrain` program (the console script pip made), in a process of its own."""
    program = shutil.which("memtrain")
    assert program, "memtrain is not on PATH: pip install -e . first"
    return subprocess.run([program, *argv], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "orchestration.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "pretrain" in out.stdout and "pipeline" in out.stdout


@pytest.mark.parametrize("words", [words for words, _ in all_commands(build_parser())], ids=" ".join)
def test_every_help_is_written_for_users(words, capsys):
    # a module docstring shown as help brings reST markup, doctest prompts and notes for developers
    with pytest.raises(SystemExit) as exit_:
        main([*words, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("usage: memtrain " + " ".join(words))
    for developer_text in ("``", ">>>", "::", "§", "register(", "func(args)", "Wire it"):
        assert developer_text not in out


def test_memory_help_lists_every_subcommand_with_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["memory", "--help"])
    out = capsys.readouterr().out
    for command in ("serve", "stats", "snapshot", "search", "add", "stop"):
        assert f"memtrain memory {command} --name semantic" in out


@pytest.fixture
def bad_inputs(tmp_path):
    """A sweep file whose corpus does not exist (next to where the commands run)."""
    (tmp_path / "sweep.yaml").write_text("pretrain: {data: {source: missing/}}\n"
                                         "search: {lr: {loguniform: [1.0e-4, 1.0e-2]}}\n")
    return tmp_path


@pytest.mark.parametrize("argv", [
    ["pretrain", "--data", "missing/", "--output", "out"],
    ["continual", "--data", "missing/", "--output", "out"],
    ["sweep", "sweep.yaml", "output=out"],
    ["rl", "train", "thermo", "--output", "out", "env_config.continual.data.source=missing/"],
], ids=lambda argv: argv[0] if argv[0] != "rl" else "rl train")
def test_a_refused_command_exits_1_with_one_line_on_stderr_and_leaves_nothing(bad_inputs, argv):
    done = memtrain(bad_inputs, *argv)
    # the corpus is checked before Ray starts (Ray's start-up logs would come first) and before the run folder
    # is made
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == ["memtrain: error: no such file or folder: 'missing/'; --data takes a path "
                                        "to a .txt/.csv/.parquet/.jsonl file or folder, a URI of one (s3://...), "
                                        "or one of builtin, wikitext2, ptb, agnews"]
    assert done.stdout == ""
    assert sorted(p.name for p in bad_inputs.iterdir()) == ["sweep.yaml"]


def test_usage_errors_exit_2_and_config_errors_exit_1(tmp_path):
    done = memtrain(tmp_path, "pretrain", "--bogus")
    assert done.returncode == 2 and done.stderr.startswith("usage: memtrain") and "--bogus" in done.stderr
    done = memtrain(tmp_path, "pretrain", "--max-steps", "ten")
    assert done.returncode == 2 and "invalid int value: 'ten'" in done.stderr
    done = memtrain(tmp_path, "pretrain", "--output", "out", "bogus=1")
    assert done.returncode == 1 and done.stderr.startswith("memtrain: error: unknown config key 'bogus'")
    assert len(done.stderr.splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_cluster_validate_prints_failures_on_stderr_and_exits_1(tmp_path):
    shipped = Path(__file__).resolve().parents[1] / "cluster"
    bad = tmp_path / "bad.yaml"
    bad.write_text((shipped / "aws.yaml").read_text().replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"))
    done = memtrain(tmp_path, "cluster", "validate", str(shipped / "aws.yaml"), str(bad))
    assert done.returncode == 1
    assert done.stdout.startswith(f"ok   {shipped / 'aws.yaml'}: aws cluster") and "FAIL" not in done.stdout
    fail, summary = done.stderr.splitlines()
    assert fail.startswith(f"FAIL {bad}: 0.0.0.0 at head_start_ray_commands")
    assert summary == "memtrain: error: 1 of 2 cluster file(s) failed validation (the FAIL lines above)"
    assert memtrain(tmp_path, "cluster", "validate", str(shipped / "gcp.yaml")).returncode == 0


def test_models_lists_every_preset_with_counts(capsys):
    assert main(["models", "--vocab-size", "512"]) == 0
    out = capsys.readouterr().out
    assert "tgsmn-dense-tiny" in out and "active/token" in out


def test_pipeline_quick_profile_writes_report_and_resumes(ray_session, tmp_path, caplog, capsys):
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
    # generate finds the pipeline's language model (its pretraining run), and refuses its RL runs with a pointer
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "The", "--max-new-tokens", "4"]) == 0
    assert f"from {tmp_path / 'pretrain' / 'checkpoints'}" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "rl-meta"), "--prompt", "The"]) != 0
    assert "is an RL run" in capsys.readouterr().err
    with caplog.at_level(logging.INFO, logger="orchestration.pipeline"):
        assert main(argv) == 0  # a second run skips the finished pretraining stage
    assert "pretraining already finished at step 30" in caplog.text
    assert json.loads((tmp_path / "summary.json").read_text())["pretrain"] == summary["pretrain"]


def test_overrides_may_follow_options(capsys):
    # `rl train ENV --iterations N key=value`: the override after the option still reaches the config
    assert main(["rl", "train", "CartPole-v1", "--iterations", "1", "ppo.bogus=1"]) == 1
    assert "unknown config key 'ppo.bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pretrain", "--bogus"])
