"""ThermoControllerEnv: gymnasium contract, PPO with an LSTM policy, the policy outside RLlib, and as a
continual-learning controller."""

import json

import numpy as np
import pytest
import yaml
from gymnasium.utils.env_checker import check_env

from orchestration.cli import main
from orchestration.config import load_config
from rl.envs.thermo import ThermoControllerEnv, baseline_policies, knobs_from_action
from rl.errors import RLError
from rl.policy import LearnedPolicy
from rl.train import RLTrainConfig, train_ppo


def test_env_contract_and_episode(thermo_env_config):
    env = ThermoControllerEnv(thermo_env_config)
    check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=3)
    assert obs.shape == env.observation_space.shape
    steps, done = 0, False
    while not done:
        obs, reward, done, truncated, info = env.step(env.action_space.sample())
        assert np.isfinite(reward) and set(info["reward_parts"]) == {"retention", "compute"}
        steps += 1
    assert steps == 4  # 2 tasks x 6 steps / 3 steps per interval


def test_action_knob_mapping_round_trips(thermo_env_config):
    env = ThermoControllerEnv(thermo_env_config)
    for policy in baseline_policies(thermo_env_config).values():
        assert env.action_space.contains(policy.action)
        back = knobs_from_action(policy.action, env.cfg)
        assert (back.k, round(back.replay_ratio, 6), round(back.router_noise, 6)) == (
            policy.knobs.k, policy.knobs.replay_ratio, policy.knobs.router_noise)
    with pytest.raises(RLError, match="bad env_config for the thermo env: unknown config key 'rewards' in env_config; "
                                      "valid keys: .*reward, compute_penalty"):
        ThermoControllerEnv({"rewards": "tiur"})


def test_ppo_lstm_policy_outside_rllib_and_in_the_runner(ray_session, thermo_env_config, tmp_path):
    run = tmp_path / "rl"
    cfg = load_config(RLTrainConfig, overrides=[
        "env=thermo", "iterations=2", f"output={run}", "ppo.use_lstm=true", "ppo.lstm_cell_size=16",
        "ppo.max_seq_len=4", "ppo.train_batch_size=16", "ppo.minibatch_size=8", "ppo.num_epochs=1",
        "ppo.fcnet_hiddens=[16]"], env_config=thermo_env_config)
    summary = train_ppo(cfg)
    assert summary["iterations"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "reward_part/retention" in rows[-1]

    # the exported policy acts like the restored Algorithm's own module
    from ray.rllib.algorithms.algorithm import Algorithm

    exported = LearnedPolicy.load(run / "policy")
    algo = Algorithm.from_checkpoint(summary["checkpoint"])
    restored = LearnedPolicy(algo.get_module(), exported.spec)
    algo.stop()
    env = ThermoControllerEnv(thermo_env_config)
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        a, b = exported.act(obs), restored.act(obs)
        assert a["k"] == b["k"] and np.allclose(a["knobs"], b["knobs"], atol=1e-5)
        obs, *_ = env.step(a)

    # and it steers a continual-learning run through the same controller interface as the fixed ones
    out = tmp_path / "cl"
    c = thermo_env_config["continual"]
    assert main(["continual", "--controller", str(run), "--tasks", "2", "--max-steps-per-task", "6",
                 "--output", str(out), "--data", "builtin", "control_interval=3", "batch_size=4", "eval_windows=4",
                 "data.seq_len=16", "data.tokenizer=bytes", f"data.cache_dir={c['data']['cache_dir']}",
                 "data.max_documents=200", *[f"model_overrides.{k}={v}" for k, v in c["model_overrides"].items()]]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["controller"] == str(run)

    # a grid with the policy's path among its controllers: the policy is resolved inside every Ray task, and each
    # cell is written under the grid's own output (named after the policy's run folder)
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({
        "base": {"data": {"source": "builtin", "tokenizer": "bytes", "seq_len": 16, "max_documents": 200,
                          "cache_dir": c["data"]["cache_dir"]},
                 "stream": {"n_tasks": 2}, "max_steps_per_task": 3, "control_interval": 3, "batch_size": 4,
                 "eval_windows": 4, "model_overrides": c["model_overrides"]},
        "controllers": ["fixed", str(run)], "seeds": [0], "output": str(tmp_path / "grid"), "cpus_per_run": 0.5}))
    assert main(["continual-grid", str(grid_file)]) == 0
    cells = {p.parent.parent.name: json.loads(p.read_text()) for p in (tmp_path / "grid").glob("*/*/*/seed0/summary.json")}
    assert set(cells) == {"fixed", "learned-rl"} and cells["learned-rl"]["controller"] == str(run)
    assert cells["learned-rl"]["status"] == "finished" and not list(run.glob("**/seed0"))
    assert "learned-rl" in (tmp_path / "grid" / "results.md").read_text()
