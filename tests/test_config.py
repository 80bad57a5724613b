from dataclasses import dataclass, field

import pytest

from athanor.config import ConfigError, OptimConfig, RunConfig, TrainConfig, load_config, to_dict


@dataclass
class Toy(TrainConfig):
    run: RunConfig = field(default_factory=lambda: RunConfig(max_steps=7))


def test_precedence_defaults_file_cli(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("optim:\n  lr: 0.5\n  betas: [0.8, 0.9]\nrun:\n  seed: 3\n")
    cfg = load_config(Toy, ["--config", str(cfg_file), "--optim.lr", "3e-4", "--run.log_every=5"])
    assert cfg.run.max_steps == 7  # recipe default kept
    assert cfg.run.seed == 3  # file
    assert cfg.optim.betas == (0.8, 0.9)  # file, typed as a tuple
    assert cfg.optim.lr == pytest.approx(3e-4)  # CLI beats file
    assert cfg.run.log_every == 5
    assert isinstance(cfg.optim, OptimConfig)
    assert to_dict(cfg)["optim"]["lr"] == pytest.approx(3e-4)


@pytest.mark.parametrize("argv, fragment", [
    (["--optim.lrr", "1"], "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    (["--nope.x", "1"], "unknown config key 'nope'"),
    (["--optim.lr", "fast"], "bad value for 'optim.lr'"),
    (["--run.max_steps", "1.5"], "bad value for 'run.max_steps'"),
    (["--optim.schedule", "exp"], "optim.schedule='exp' is not one of: constant, cosine, linear"),
    (["--optim.lr", "-1"], "optim.lr=-1.0 must be > 0"),
    (["--engine.mixed_precision", "fp8"], "engine.mixed_precision='fp8' is not one of"),
    (["--config", "/does/not/exist.yaml"], "config file not found"),
    (["--run.resume", "/no/such/checkpoint"], "run.resume='/no/such/checkpoint'"),
    (["--optim.lr"], "--optim.lr needs a value"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_bad_input_is_one_clear_error(argv, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(Toy, argv)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_unreadable_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(Toy, ["--config", str(bad)])


def test_unknown_key_in_file_names_valid_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match="valid keys in 'run': output_dir, seed, max_steps"):
        load_config(Toy, ["--config", str(f)])
