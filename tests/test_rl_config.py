"""One config system: env_config and model_overrides checked by their own config classes when a config is loaded
(before Ray starts, nothing written), rl tune's search: syntax against the sweep's, and the pipeline's RL runs
composed from configs/rl/."""

import dataclasses

import pytest
import yaml

from orchestration.cli import main
from orchestration.config import load_config, to_yaml
from orchestration.continual.runner import ContinualConfig
from orchestration.errors import ConfigError
from orchestration.sweep import SweepConfig, planned_trials, tune_space
from orchestration.training.pretrain import PretrainConfig
from rl.train import RLTrainConfig
from rl.tune import PPOTuneConfig


@pytest.mark.parametrize("override, valid", [
    ("env_config.rewards=tiur", ["reward", "compute_penalty", "task_seeds", "continual.stream.n_tasks"]),
    ("env_config.continual.stream.n_taks=2", ["continual.stream.n_tasks", "continual.stream.task_seed"]),
])
def test_bad_env_config_key_is_refused_at_load_with_the_valid_keys(override, valid, tmp_path, capsys):
    with pytest.raises(ConfigError, match="bad env_config for the thermo env: unknown config key") as err:
        load_config(RLTrainConfig, overrides=["env=thermo", override])
    listed = str(err.value).split("valid keys: ")[1].split(", ")
    assert set(valid) <= set(listed)
    # the command refuses it before anything runs: no run folder, the valid keys on stderr
    out = tmp_path / "run"
    assert main(["rl", "train", "thermo", "--iterations", "5", "--output", str(out), override]) != 0
    stderr = capsys.readouterr().err
    assert not out.exists() and "valid keys: " in stderr and all(key in stderr for key in valid)


def test_env_config_values_and_env_names_are_checked_at_load():
    with pytest.raises(ConfigError, match="env_config.memory must be 'actor' or 'local'"):
        load_config(RLTrainConfig, overrides=["env=meta", "env_config.memory=disk"])
    with pytest.raises(ConfigError, match="unknown env 'thermos'; memtrain envs: meta, thermo"):
        load_config(RLTrainConfig, overrides=["env=thermos"])
    with pytest.raises(ConfigError, match="CartPole-v1 is a gymnasium env and takes no env_config"):
        load_config(RLTrainConfig, overrides=["env=CartPole-v1", "env_config.reward=tiur"])
    with pytest.raises(ConfigError, match="env_config.seed: the env's seed is the run's; set seed=3"):
        load_config(RLTrainConfig, overrides=["env=thermo", "env_config.seed=3"])
    # the preset loads, and RLlib gets every setting of the typed config (the continual run too) with the run's seed
    cfg = load_config(RLTrainConfig, "configs/rl/thermo.yaml", ["seed=7", "env_config.continual.stream.n_tasks=2"])
    rllib = cfg.rllib_env_config()
    assert rllib["seed"] == 7 and rllib["task_seeds"] == [0, 1] and rllib["continual"]["stream"]["n_tasks"] == 2
    assert rllib["continual"]["max_steps_per_task"] == 30 and cfg.env_config["continual"] == {"stream": {"n_tasks": 2}}


@pytest.mark.parametrize("cls, base, key", [(PretrainConfig, [], "model_overrides"),
                                            (ContinualConfig, [], "model_overrides"),
                                            (RLTrainConfig, ["env=thermo"], "env_config.continual.model_overrides")])
def test_bad_model_override_is_refused_at_load_with_the_valid_fields(cls, base, key):
    with pytest.raises(ConfigError, match=r"model_overrides: unknown config field\(s\) \['n_layerz'\] for model .*"
                                          r"valid fields: .*d_model, .*n_layers"):
        load_config(cls, overrides=[*base, f"{key}.n_layerz=2"])
    with pytest.raises(ConfigError, match=r"model_overrides: field n_layers of model .* must be int, got 2.5 "
                                          r"\(float\); valid fields: .*d_model"):
        load_config(cls, overrides=[*base, f"{key}.n_layers=2.5"])
    with pytest.raises(ConfigError, match="d_model=33 must be divisible by n_heads"):
        load_config(cls, overrides=[*base, f"{key}.d_model=33"])
    assert load_config(cls, overrides=[*base, f"{key}.n_layers=3"])


def test_pretrain_command_refuses_a_bad_model_override_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--data", "builtin", "--output", str(out), "model_overrides.n_layerz=2"]) != 0
    assert not out.exists() and "valid fields: " in capsys.readouterr().err


def _trials(search: dict, num_samples: int, seed: int) -> list[dict]:
    """The trial configs Tune makes of a search space, with the generator both sweeps hand it."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    generator = BasicVariantGenerator(random_state=seed)
    generator.add_configurations({"trials": {"run": lambda config: None, "config": tune_space(search),
                                             "num_samples": num_samples}})
    trials = []
    while (trial := generator.next_trial()) is not None:
        trials.append(trial.config)
    return trials


def test_rl_tune_search_expands_to_the_same_trials_as_a_sweep(tmp_path):
    # the same space written for each: in a YAML file's search: section and as a command-line override
    block = {"seed": {"grid": [0, 1]}, "{lr}": {"loguniform": [1.0e-4, 1.0e-2]}}
    sweep_file, tune_file = tmp_path / "sweep.yaml", tmp_path / "tune.yaml"
    sweep_file.write_text(yaml.safe_dump({"search": {k.format(lr="lr"): v for k, v in block.items()},
                                          "num_samples": 2, "seed": 5}))
    tune_file.write_text(yaml.safe_dump({"search": {"seed": block["seed"]}, "num_samples": 2, "seed": 5}))
    sweep = load_config(SweepConfig, sweep_file, ["search.weight_decay.choice=[0.0,0.1]"])
    tune = load_config(PPOTuneConfig, tune_file, ["search.ppo.lr.loguniform=[1.0e-4,1.0e-2]",
                                                  "search.ppo.vf_loss_coeff.choice=[0.0,0.1]"])
    renamed = {"lr": "ppo.lr", "weight_decay": "ppo.vf_loss_coeff", "seed": "seed"}
    assert tune.search == {renamed[k]: v for k, v in sweep.search.items()}
    assert planned_trials(tune) == planned_trials(sweep) == 4
    sweep_trials = [{renamed[k]: v for k, v in t.items()} for t in _trials(sweep.search, 2, 5)]
    assert _trials(tune.search, tune.num_samples, tune.seed) == sweep_trials and len(sweep_trials) == 4
    # and a bad spec is refused by both with the sweep's message
    for cls, key in ((SweepConfig, "lr"), (PPOTuneConfig, "ppo.lr")):
        with pytest.raises(ConfigError, match=rf"search.{key}.loguniform needs low > 0, got 0"):
            load_config(cls, overrides=[f"search.{key}.loguniform=[0,1]"])


def test_rl_tune_checks_its_search_space_as_run_configs():
    with pytest.raises(ConfigError, match="search key 'ppo.lrr' is not a field of the PPO run config; valid keys: "
                                          "env_config, seed, ppo.lr"):
        load_config(PPOTuneConfig, overrides=["search.ppo.lrr.grid=[1.0e-3]"])
    with pytest.raises(ConfigError, match="search key 'iterations' cannot be searched"):
        load_config(PPOTuneConfig, overrides=["search.iterations.grid=[1,2]"])
    with pytest.raises(ConfigError, match=r"invalid trial config at \{'env_config.reward': 'best'\}: bad env_config "
                                          "for the thermo env: reward must be retention or tiur"):
        load_config(PPOTuneConfig, overrides=["base.env=thermo", "search.env_config.reward.grid=[tiur,best]"])
    with pytest.raises(ConfigError, match="the search space is empty"):
        load_config(PPOTuneConfig)


def test_pipeline_rl_runs_are_the_presets_with_the_pipeline_sizes_on_top():
    from orchestration.pipeline import PROFILES, PipelineConfig

    thermo_preset = load_config(RLTrainConfig, "configs/rl/thermo.yaml")
    meta_preset = load_config(RLTrainConfig, "configs/rl/meta.yaml")
    cfg = load_config(PipelineConfig, overrides=PROFILES["default"])
    # everything but the pipeline's sizes comes from configs/rl/
    assert dataclasses.replace(cfg.thermo.ppo, minibatch_size=thermo_preset.ppo.minibatch_size) == thermo_preset.ppo
    assert cfg.thermo.env_config == thermo_preset.env_config and cfg.thermo.iterations == 10
    assert dataclasses.replace(cfg.meta.ppo, train_batch_size=240, minibatch_size=60) == meta_preset.ppo
    assert cfg.meta.env_config == {} and cfg.meta.ppo.gamma == 0.3
    quick = load_config(PipelineConfig, overrides=PROFILES["quick"])
    assert quick.thermo.env_settings().continual.stream.n_tasks == 2 and quick.meta.ppo.minibatch_size == 4
    with pytest.raises(ConfigError, match="meta.env_config.memory_name is set by the pipeline"):
        load_config(PipelineConfig, overrides=["meta.env_config.memory_name=x"])
    with pytest.raises(ConfigError, match="bad env_config for the thermo env: unknown config key 'continual.nope'"):
        load_config(PipelineConfig, overrides=["thermo.env_config.continual.nope=1"])
    assert "thermo:" in to_yaml(cfg) and "thermo_iterations" not in to_yaml(cfg)


def test_a_run_resumes_when_its_env_settings_are_the_same_however_spelled(tmp_path):
    from orchestration.storage import Location
    from rl.errors import RLError
    from rl.train import _check_resumable

    cfg = load_config(RLTrainConfig, "configs/rl/thermo.yaml", ["trust_checkpoint=true", f"output={tmp_path}"])
    saved = {**dataclasses.asdict(cfg), "env_config": {"task_seeds": [0, 1]}}  # the env's defaults left out
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    _check_resumable(Location(str(tmp_path)), cfg, latest=None)
    saved["env_config"]["compute_penalty"] = 0.1
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(RLError, match=r"cannot be resumed: env_config.compute_penalty: 0.1 -> 0.05"):
        _check_resumable(Location(str(tmp_path)), cfg, latest=None)
