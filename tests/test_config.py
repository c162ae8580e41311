"""flash_jax/config.py: config files, `--config.KEY=VALUE` overrides (lists too), value checks."""

import importlib
import math
import re
from pathlib import Path

import pytest

from configs.shapes import imagine_flash as if_config
from configs.shapes import teacher as teacher_config
from flash_jax import config as flash_config

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_parse_literals_and_refuse_unknown_keys():
    config = teacher_config.get_config()
    flash_config.apply_overrides(
        config, ["optimizer.learning_rate=1e-3", "data.image_size=16", "autoencoder_workdir=a/b"]
    )
    assert config.optimizer.learning_rate == 1e-3 and config.data.image_size == 16
    assert config.autoencoder_workdir == "a/b"
    with pytest.raises(flash_config.ConfigError, match=r"'optimizer\.nope'"):
        flash_config.apply_overrides(config, ["optimizer.nope=1"])
    with pytest.raises(flash_config.ConfigError, match="KEY=VALUE"):
        flash_config.apply_overrides(config, ["batch_size"])


def test_unknown_key_names_the_nearest_keys():
    config = if_config.get_config()
    with pytest.raises(flash_config.ConfigError) as e:
        flash_config.apply_overrides(config, ["imagine_flash.gama_a=0.5"])
    assert str(e.value).startswith("unknown config key 'imagine_flash.gama_a'; nearest: ")
    assert "imagine_flash.gamma_a" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(flash_config.ConfigError, match=r"nearest: optimizer\.learning_rate"):
        flash_config.apply_overrides(config, ["optimiser.learning_rate=1"])
    with pytest.raises(flash_config.ConfigError, match="is a group"):
        flash_config.apply_overrides(config, ["optimizer=1"])


@pytest.mark.parametrize("text", ["1,2,3", "[1,2,3]", "(1, 2, 3)"])
def test_list_knobs_are_settable_from_the_command_line(text):
    config = if_config.get_config()
    flash_config.apply_overrides(config, [f"imagine_flash.student_steps={text}"])
    assert config.imagine_flash.student_steps == [1, 2, 3]
    flash_config.apply_overrides(config, ["imagine_flash.student_steps=2"])
    assert config.imagine_flash.student_steps == [2]


def test_values_are_parsed_as_the_type_they_replace():
    config = if_config.get_config()
    flash_config.apply_overrides(
        config, ["imagine_flash.srl=false", "optimizer.learning_rate=1", "imagine_flash.gamma=sd3"]
    )
    assert config.imagine_flash.srl is False and config.imagine_flash.gamma == "sd3"
    assert isinstance(config.optimizer.learning_rate, float)
    flash_config.apply_overrides(config, ["imagine_flash.guidance_scale=nan"])
    assert math.isnan(config.imagine_flash.guidance_scale)
    with pytest.raises(flash_config.ConfigError, match="expected int, got 'four'"):
        flash_config.apply_overrides(config, ["batch_size=four"])
    with pytest.raises(flash_config.ConfigError, match="expected true or false"):
        flash_config.apply_overrides(config, ["imagine_flash.srl=maybe"])


def test_split_overrides_takes_both_flag_forms():
    rest, overrides = flash_config.split_overrides(
        ["prog", "--config=c.py:tiny", "--config.a.b=1", "--config.c", "2,3", "--mode=sample"]
    )
    assert rest == ["prog", "--config=c.py:tiny", "--mode=sample"]
    assert overrides == ["a.b=1", "c=2,3"]
    with pytest.raises(flash_config.ConfigError, match="no value"):
        flash_config.split_overrides(["prog", "--config.a"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("keep_checkpoints=0", "config.keep_checkpoints=0 must be an integer >= 1"),
        ("total_steps=-1", "config.total_steps=-1 must be an integer >= 0"),
        ("batch_size=0", "config.batch_size=0 must be an integer >= 1"),
        ("checkpoint_every=0", "config.checkpoint_every=0 must be an integer >= 1"),
        ("imagine_flash.guidance_scale=nan", "guidance_scale=nan must be a finite number"),
        ("imagine_flash.guidance_scale=-2", "guidance_scale=-2.0 must be a finite number in [0,"),
        ("imagine_flash.student_steps=0,3", "student_steps=[0, 3] must be integers >= 1"),
        ("data.source=bogus", "config.data.source='bogus' must be one of ['shapes', 'captions'"),
        ("optimizer.b2=1", "config.optimizer.b2=1.0 must be a finite number in [0, 1)"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_key(override, message):
    config = if_config.get_config()
    flash_config.apply_overrides(config, [override])
    with pytest.raises(flash_config.ConfigError, match=re.escape(message)):
        flash_config.check_training(config)


@pytest.mark.parametrize(
    "name", ["autoencoder", "teacher", "judge", "imagine_flash", "lcm", "add", "step_distill"]
)
def test_every_shipped_training_config_passes_the_checks(name):
    module = importlib.import_module(f"configs.shapes.{name}")
    flash_config.check_training(module.get_config())
    flash_config.check_training(module.get_config("tiny"))


def test_load_config_file_names_a_missing_file(tmp_path):
    with pytest.raises(flash_config.ConfigError, match=r"nope\.py"):
        flash_config.load_config_file(str(tmp_path / "nope.py") + ":tiny")
    config = flash_config.load(str(ROOT / "configs/shapes/teacher.py") + ":tiny", ["seed=3"])
    assert config.seed == 3 and config.is_locked
