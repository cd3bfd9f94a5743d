"""How controllers are judged: held-out entities and task streams, the fixed-setting grids, paired comparisons and
the intervals the pipeline reports."""

import numpy as np
import pytest
from scipy import stats

from models.hmst.facts import FactConfig, FactWorld
from orchestration.pipeline import wilson_ci95
from rl.envs.meta import MetaControllerEnv, fixed_combinations
from rl.envs.thermo import ThermoControllerEnv, knob_grid
from rl.errors import RLError
from rl.evaluate import compare, evaluate


def test_heldout_sessions_only_ask_about_entities_training_sessions_never_see():
    asked = {}
    for part in ("train", "heldout"):
        env = MetaControllerEnv({"memory": "local", "queries": 6, "n_entities": 40, "entities": part})
        asked[part] = set()
        for seed in range(12):
            env.reset(seed=seed)
            asked[part] |= {f.entity for f in env._questions}
        env.close()
    world = FactWorld(FactConfig(n_entities=40))
    heldout = {f.entity for f in world.split(world.facts, "heldout", 0.25)}
    assert asked["heldout"] and asked["heldout"] <= heldout
    assert asked["train"] and not asked["train"] & heldout
    assert len(heldout) == 10  # a quarter of the 40 entities


def test_fixed_combinations_cover_every_gate_setting_once():
    combos = fixed_combinations(n_experts=4)
    actions = {tuple(policy.act(None)) for policy in combos.values()}
    assert len(combos) == len(actions) == 2 ** 4 * 5  # four on/off gates x (no bias or one of 4 experts)
    assert (0, 0, 0, 0, 0) in actions and (1, 1, 1, 4, 1) in actions
    on_off = {tuple(policy.act(None)) for policy in fixed_combinations(n_experts=4, experts=[0, 1]).values()}
    assert len(on_off) == 32 and on_off <= actions
    with pytest.raises(RLError, match="must be in 0..4"):
        fixed_combinations(n_experts=4, experts=[5])


def test_compare_agrees_with_a_paired_t_test():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, 6)
    rows = [{"policy": "base", "per_seed": list(base)},
            {"policy": "better", "per_seed": list(base + 0.8 + rng.normal(0, 0.2, 6))},
            {"policy": "same", "per_seed": list(base + [0.3, -0.3, 0.2, -0.2, 0.1, -0.05])}]
    out = {r["policy"]: r for r in compare(rows, "base")}
    for name in ("better", "same"):
        p = stats.ttest_rel(rows[[r["policy"] for r in rows].index(name)]["per_seed"], base).pvalue
        assert out[name]["significant"] == (p < 0.05)
    assert out["better"]["significant"] and not out["same"]["significant"] and out["base"]["significant"] is None
    with pytest.raises(ValueError, match="no row 'nope'"):
        compare(rows, "nope")


@pytest.mark.parametrize("hits,n", [(0, 24), (5, 96), (50, 96), (96, 96)])
def test_wilson_interval_matches_scipy(hits, n):
    expected = stats.binomtest(hits, n).proportion_ci(method="wilson")
    assert wilson_ci95(hits, n) == pytest.approx((expected.low, expected.high), abs=1e-6)


def test_thermo_episodes_cycle_through_their_task_streams(thermo_env_config):
    env = ThermoControllerEnv({**thermo_env_config, "task_seeds": [0, 7]})
    streams = []
    for episode in range(3):
        env.reset(seed=episode)
        streams.append(env.runner)
    assert streams[0] is streams[2] and streams[0] is not streams[1]
    first, second = (np.load(s.stream.tasks[1].shards["train"]) for s in streams[:2])
    assert not np.array_equal(first, second)  # another task_seed: other permutations and document split


def test_knob_grid_and_seed_config_evaluate_each_stream(thermo_env_config):
    grid = knob_grid(thermo_env_config, replay=(0.0, 0.5), noise=(0.3,), temperature=(1.0,))
    assert sorted(grid) == ["k1-r0-n0.3-t1", "k1-r0.5-n0.3-t1", "k2-r0-n0.3-t1", "k2-r0.5-n0.3-t1"]
    rows = evaluate("thermo", thermo_env_config, {name: grid[name] for name in ("k1-r0-n0.3-t1", "k2-r0-n0.3-t1")},
                    seeds=[3, 4], episodes=1, seed_config=lambda stream: {"task_seeds": [stream]})
    by_name = {r["policy"]: r for r in rows}
    # the compute part is -penalty * k / k_max per interval, 4 intervals: k 1 pays half of k 2
    assert by_name["k1-r0-n0.3-t1"]["compute"] == pytest.approx(by_name["k2-r0-n0.3-t1"]["compute"] / 2)
    assert len(by_name["k1-r0-n0.3-t1"]["per_seed"]) == 2
    assert by_name["k1-r0-n0.3-t1"]["per_seed"][0] != by_name["k1-r0-n0.3-t1"]["per_seed"][1]  # two streams
