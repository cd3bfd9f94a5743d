import pytest

from orchestration.config import load_config, to_yaml
from orchestration.errors import ConfigError
from orchestration.training.pretrain import PretrainConfig


def test_defaults_file_flags_and_overrides_layer_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 11\nlr: 0.5\ndata:\n  seq_len: 32\n")
    cfg = load_config(PretrainConfig, path, ["lr=0.25", "data.vocab_size=512", "model_overrides.n_layers=2"],
                      max_steps=12)
    assert (cfg.max_steps, cfg.lr, cfg.data.seq_len, cfg.data.vocab_size) == (12, 0.25, 32, 512)
    assert cfg.model_overrides == {"n_layers": 2}
    assert cfg.batch_size == PretrainConfig().batch_size
    assert "max_steps: 12" in to_yaml(cfg)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, overrides=["max_step=3"])
    assert "'max_step'" in str(err.value) and "max_steps" in str(err.value) and "data.seq_len" in str(err.value)


def test_unknown_nested_key_and_file_key(tmp_path):
    with pytest.raises(ConfigError, match="'data.seqlen'.*data.seq_len"):
        load_config(PretrainConfig, overrides=["data.seqlen=3"])
    path = tmp_path / "c.yaml"
    path.write_text("bogus: 1\n")
    with pytest.raises(ConfigError, match="'bogus' in .*c.yaml"):
        load_config(PretrainConfig, path)


def test_bad_values_are_refused():
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(PretrainConfig, overrides=["max_steps=many"])
    with pytest.raises(ConfigError, match="precision must be fp32 or bf16"):
        load_config(PretrainConfig, overrides=["precision=fp8"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(PretrainConfig, overrides=["max_steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PretrainConfig, "/nonexistent/config.yaml")
