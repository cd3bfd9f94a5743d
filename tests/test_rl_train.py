"""The PPO machinery (training, resume, policy export/load) on gymnasium's classic-control envs."""

import json

import gymnasium as gym
import numpy as np
import pytest

from orchestration.config import load_config
from rl.errors import RLError
from rl.policy import LearnedPolicy
from rl.train import RLTrainConfig, train_ppo

TINY = ["ppo.train_batch_size=128", "ppo.minibatch_size=64", "ppo.num_epochs=1", "ppo.fcnet_hiddens=[16]"]


def test_train_resume_and_export(ray_session, tmp_path):
    cfg = load_config(RLTrainConfig, overrides=["env=CartPole-v1", "iterations=1", f"output={tmp_path}", *TINY])
    first = train_ppo(cfg)
    assert first["iterations"] == 1 and (tmp_path / "checkpoints" / "iter_0001").is_dir()
    first_rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    with pytest.raises(RLError, match=r"holds RLlib checkpoints \(iter_0001\); resuming loads their pickles"):
        train_ppo(load_config(RLTrainConfig, overrides=["env=CartPole-v1", "iterations=2", f"output={tmp_path}", *TINY]))
    with pytest.raises(RLError, match=r"other settings, so it cannot be resumed: ppo.lr: 0.0003 -> 0.001"):
        train_ppo(load_config(RLTrainConfig, overrides=["env=CartPole-v1", "iterations=2", f"output={tmp_path}",
                                                        "trust_checkpoint=true", "ppo.lr=1e-3", *TINY]))
    second = train_ppo(load_config(RLTrainConfig, overrides=["env=CartPole-v1", "iterations=2",
                                                             f"output={tmp_path}", "trust_checkpoint=true", *TINY]))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2] and second["iterations"] == 2
    # it went on from iteration 1 (restored, not trained again from scratch): that row is the first run's
    assert rows[0] == first_rows[0] and rows[1]["env_steps"] > rows[0]["env_steps"]
    assert {"episode_return_mean", "env_steps_per_s", "policy_loss", "action_mean/action_0"} <= set(rows[-1])
    policy = LearnedPolicy.load(tmp_path / "policy")
    obs, _ = gym.make("CartPole-v1").reset(seed=0)
    action = policy.act(obs)
    assert action in (0, 1) and policy.act(obs) == action  # deterministic


def test_recurrent_policy_carries_state_and_maps_box_actions(ray_session, tmp_path):
    cfg = load_config(RLTrainConfig, overrides=["env=Pendulum-v1", "iterations=1", f"output={tmp_path}",
                                                "ppo.use_lstm=true", "ppo.lstm_cell_size=8", "ppo.max_seq_len=4",
                                                *TINY])
    train_ppo(cfg)
    policy = LearnedPolicy.load(tmp_path / "policy")
    space = gym.make("Pendulum-v1").action_space
    obs = np.array([1.0, 0.0, 0.5], dtype=np.float32)
    first, second = policy.act(obs), policy.act(obs)
    assert space.contains(np.asarray(first, dtype=np.float32))
    policy.reset()
    assert np.allclose(policy.act(obs), first) and not np.allclose(first, second)  # state moved on, reset restores


def test_bad_inputs(tmp_path):
    with pytest.raises(RLError, match="no exported policy"):
        LearnedPolicy.load(tmp_path)
    from rl.envs import make_env

    with pytest.raises(RLError, match="unknown env 'nope'.*meta, thermo"):
        make_env("nope")


def test_mean_ci95():
    from rl.evaluate import mean_ci95

    mean, half = mean_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.3027 / np.sqrt(3), rel=1e-3)
    assert mean_ci95([5.0]) == (5.0, 0.0)


def test_ppo_hyperparameter_sweep_ranks_trials(ray_session, tmp_path):
    from rl.tune import PPOTuneConfig, tune_ppo

    cfg = load_config(PPOTuneConfig, overrides=[
        "base.env=CartPole-v1", *[f"base.{o}" for o in TINY], "iterations=2", "search.ppo.lr.grid=[1.0e-3,1.0e-4]",
        f"output={tmp_path}"])
    rows = tune_ppo(cfg)
    assert len(rows) == 2 and {r["ppo.lr"] for r in rows} == {1e-3, 1e-4} and all(r["error"] is None for r in rows)
    # each trial's own results, as Tune logged them in its folder (one line per PPO iteration)
    own_return = {}
    for row in rows:
        results = [json.loads(line) for line in (tmp_path / "tune" / row["trial"] / "result.json").read_text()
                   .splitlines()]
        assert [r["training_iteration"] for r in results] == [1, 2] and row["iterations"] == 2
        assert results[-1]["config"]["ppo.lr"] == row["ppo.lr"]
        own_return[row["trial"]] = results[-1]["env_runners"]["episode_return_mean"]  # the last iteration's
        assert row["return_mean"] == pytest.approx(own_return[row["trial"]])
    # ranked by those returns, highest first; best.yaml is the winner's run config, which rl train loads
    assert [r["trial"] for r in rows] == sorted(own_return, key=own_return.get, reverse=True)
    best = load_config(RLTrainConfig, tmp_path / "best.yaml")
    assert best.ppo.lr == rows[0]["ppo.lr"] and best.env == "CartPole-v1" and best.ppo.train_batch_size == 128
    assert rows[0]["trial"] in (tmp_path / "results.md").read_text().splitlines()[4]
