"""MetaControllerEnv: gymnasium contract, speed, baselines, PPO training, exported policy, remote env runner."""

import os
import uuid

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from rl.envs import make_env
from rl.envs.meta import MetaControllerEnv, baseline_policies
from rl.errors import RLError

LOCAL = {"memory": "local", "queries": 4}
TINY = ["ppo.train_batch_size=32", "ppo.minibatch_size=16", "ppo.num_epochs=1", "ppo.fcnet_hiddens=[16]"]


def test_env_passes_the_gymnasium_checker_and_is_fast():
    env = make_env("meta", LOCAL)
    check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=3)
    steps, done = 0, False
    while not done:
        obs, reward, done, _, info = env.step(env.action_space.sample())
        steps += 1
        assert env.observation_space.contains(obs) and set(info["reward_parts"]) == {"correct", "cost", "calibration"}
        assert reward == pytest.approx(sum(info["reward_parts"].values()))
    assert steps == 4
    env.close()


def test_episode_is_a_session_and_baselines_differ_in_cost():
    env = MetaControllerEnv({**LOCAL, "told": 2})
    costs = {}
    for name, policy in baseline_policies(LOCAL).items():
        obs, _ = env.reset(seed=0)
        policy.reset()
        total, done = 0.0, False
        while not done:
            obs, _, done, _, info = env.step(policy.act(obs))
            total += info["reward_parts"]["cost"]
        costs[name] = total
        assert len(env.session.episodic) >= 2  # told facts + answered turns carried through the episode
    assert costs["all_off"] > costs["retrieval_only"] > costs["all_on"]  # costs are negative: all_on spends most
    with pytest.raises(RLError, match="outside"):
        env.step(np.array([0, 0, 0, 9, 0]))
    with pytest.raises(RLError, match="bad env_config"):
        MetaControllerEnv({"memory": "local", "nope": 1})


def test_ppo_trains_and_the_exported_policy_acts_like_the_module(ray_session, tmp_path):
    import torch
    from ray.rllib.core import Columns

    from orchestration.config import load_config
    from rl.policy import LearnedPolicy
    from rl.train import RLTrainConfig, build_ppo_config, train_ppo

    cfg = load_config(RLTrainConfig, overrides=["env=meta", "iterations=2", f"output={tmp_path}",
                                                "env_config.memory=local", "env_config.queries=4", *TINY])
    summary = train_ppo(cfg)
    assert summary["iterations"] == 2
    policy = LearnedPolicy.load(tmp_path / "policy")
    algo = build_ppo_config(cfg).build_algo()
    try:
        algo.restore(summary["checkpoint"])
        module = algo.get_module()
        env = MetaControllerEnv({"memory": "local", "queries": 4})
        obs, _ = env.reset(seed=1)
        for _ in range(3):
            out = module.forward_inference({Columns.OBS: torch.as_tensor(obs)[None]})
            dist = module.get_inference_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS])
            expected = dist.to_deterministic().sample()[0].numpy()
            assert np.array_equal(policy.act(obs), expected)
            obs, *_ = env.step(expected)
    finally:
        algo.stop()


@pytest.mark.slow
def test_remote_env_runner_reaches_the_named_memory_actor(ray_session, tmp_path):
    from memory_service import get_or_create_memory
    from orchestration.config import load_config
    from rl.train import RLTrainConfig, train_ppo

    name = f"meta-env-{uuid.uuid4().hex[:8]}"
    cfg = load_config(RLTrainConfig, overrides=[
        "env=meta", "iterations=1", f"output={tmp_path / 'run'}", "num_env_runners=1", "env_config.memory=actor",
        f"env_config.memory_name={name}", "env_config.namespace=memtrain-tests",
        f"env_config.memory_path={tmp_path / 'mem'}", "env_config.queries=4", *TINY])
    train_ppo(cfg)
    memory = get_or_create_memory(name, namespace="memtrain-tests")
    try:
        stats = memory.stats()
        assert stats["count"] > 0 and stats["searched_queries"] > 0
        _, meta = memory.get([0])[0]
        assert meta["filled_by_pid"] != os.getpid()  # the env in the runner process filled it
    finally:
        memory.shutdown(snapshot=False)
