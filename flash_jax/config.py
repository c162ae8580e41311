"""Configs: load a config file, apply `--config.KEY=VALUE` overrides, check values before compute.

A config file is a Python module whose `get_config(arg)` returns an ml_collections ConfigDict;
`path/to/config.py:arg` passes `arg` (the variants). Overrides name a dotted key that must exist:
an unknown one is a one-line `ConfigError` naming the key and the nearest valid keys. A VALUE is
parsed as the type of the value it replaces: list/tuple knobs take `1,2,3`, `[1,2,3]` or `(1,2,3)`
(`--config.imagine_flash.student_steps=1,2,3`), booleans `true/false`, floats also `nan`/`inf`
(which `check_training` then refuses where they make no sense).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only a type here: GPU boxes without ml_collections can import the trainer
    import ml_collections

OVERRIDE_PREFIX = "--config."


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it."""


def read_json(path: str | Path, hint: str = "") -> Any:
    """The JSON value stored in `path` (a run's config.json, an evaluation's results.json...).

    Raises:
      ConfigError: the file is missing, unreadable or not complete JSON, naming it (then `hint`,
        what to do about it).
    """
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else f"not valid JSON ({e})"
        raise ConfigError(f"{path}: {reason}" + (f"; {hint}" if hint else "")) from None


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` -> the file's `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if module_spec is None or not Path(path).is_file():
        raise ConfigError(f"config file {path!r} not found")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def dotted_keys(config: Any, prefix: str = "") -> Iterator[str]:
    """Every leaf key of a (nested) ConfigDict as `a.b.c`."""
    for k, v in config.items():
        if hasattr(v, "items"):
            yield from dotted_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _unknown_key(config: Any, key: str) -> ConfigError:
    near = difflib.get_close_matches(key, list(dotted_keys(config)), n=3, cutoff=0.6)
    hint = f"; nearest: {', '.join(near)}" if near else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _node_and_leaf(config: Any, key: str) -> tuple[Any, str]:
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        if p not in node or not hasattr(node[p], "items"):
            raise _unknown_key(config, key)
        node = node[p]
    if leaf not in node:
        raise _unknown_key(config, key)
    if hasattr(node[leaf], "items"):
        raise ConfigError(f"config key {key!r} is a group: set its keys ({key}.KEY=VALUE)")
    return node, leaf


def set_dotted(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """`config.a.b = value` for `key = "a.b"`; an unknown key or a wrong type is a `ConfigError`."""
    node, leaf = _node_and_leaf(config, key)
    current = node[leaf]
    if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
        value = type(current)(value)
    try:
        with config.unlocked():
            node[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key {key!r}: cannot set {value!r}: {e}") from None


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_value(text: str, current: Any) -> Any:
    """The value `text` means for a knob whose value is now `current` (see the module doc)."""
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if isinstance(current, (list, tuple)):
        value = _literal(text)
        if not isinstance(value, (list, tuple)):
            items = [t.strip() for t in text.strip("[]()").split(",") if t.strip()]
            value = [_literal(t) for t in items]
        return type(current)(value)
    if isinstance(current, (int, float)):
        try:
            return type(current)(text)
        except ValueError:
            raise ValueError(f"expected {type(current).__name__}, got {text!r}") from None
    return _literal(text)


def apply_overrides(config: ml_collections.ConfigDict, items: Sequence[str]) -> None:
    """Sets each `KEY=VALUE` of `items` (VALUE parsed by `parse_value`)."""
    for item in items:
        key, eq, text = item.partition("=")
        if not eq:
            raise ConfigError(f"config override {item!r}: expected KEY=VALUE")
        node, leaf = _node_and_leaf(config, key)
        try:
            value = parse_value(text, node[leaf])
        except ValueError as e:
            raise ConfigError(f"config key {key!r}: {e}") from None
        set_dotted(config, key, value)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """`(other args, ["KEY=VALUE", ...])` of a command line: `--config.KEY=VALUE` and
    `--config.KEY VALUE` are overrides."""
    rest, overrides = [], []
    args = iter(argv)
    for arg in args:
        if not arg.startswith(OVERRIDE_PREFIX):
            rest.append(arg)
        elif "=" in arg:
            overrides.append(arg.removeprefix(OVERRIDE_PREFIX))
        else:
            value = next(args, None)
            if value is None:
                raise ConfigError(f"{arg}: no value (--config.KEY=VALUE)")
            overrides.append(f"{arg.removeprefix(OVERRIDE_PREFIX)}={value}")
    return rest, overrides


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config of `spec` (`file.py[:arg]`) with `overrides` applied, locked."""
    config = load_config_file(spec)
    apply_overrides(config, overrides)
    config.lock()
    return config


# ------------------------------------------------------------------ value checks (before compute)

Rule = tuple[Callable[[Any], bool], str]


def _integer(low: int) -> Rule:
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low  # noqa: E731
    return ok, f"an integer >= {low}"


def _number(low: float, high: float = math.inf, *, open_low=False, open_high=False) -> Rule:
    def ok(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (v > low if open_low else v >= low) and (v < high if open_high else v <= high)

    lo, hi = ("(" if open_low else "["), (")" if open_high else "]")
    return ok, f"a finite number in {lo}{low}, {high}{hi}"


def _one_of(*choices: str) -> Rule:
    return (lambda v: v in choices), f"one of {list(choices)}"


_OPTIMIZER = {
    "learning_rate": _number(0),
    "warmup_steps": _integer(0),
    "grad_clip": _number(0, open_low=True),
    "b1": _number(0, 1, open_high=True),
    "b2": _number(0, 1, open_high=True),
    "eps": _number(0, open_low=True),
    "weight_decay": _number(0),
}
TRAINING_RULES: dict[str, Rule] = {
    "total_steps": _integer(0),
    "batch_size": _integer(1),
    "log_every": _integer(1),
    "checkpoint_every": _integer(1),
    "keep_checkpoints": _integer(1),  # 0 would delete the final checkpoint too
    "sample_every": _integer(1),
    "num_samples": _integer(1),
    "ema_decay": _number(0, 1),
    "fsdp_min_size": _integer(0),
    "frozen_dtype": _one_of("float32", "bfloat16", "float16"),
    "data.image_size": _integer(0),  # 0: the data cache's or the model's native size
    "data.num_records": _integer(0),
    "data.source": _one_of("shapes", "captions", "cache"),
    **{f"optimizer.{k}": r for k, r in _OPTIMIZER.items()},
    **{f"disc_optimizer.{k}": r for k, r in _OPTIMIZER.items()},
}
# Wherever these leaves appear (method and sampler sections): CFG scale 1 = unguided, 0 = the
# unconditional prediction; a student's step counts.
LEAF_RULES: dict[str, Rule] = {
    "guidance_scale": _number(0),
    "guidance_rescale": _number(0, 1),
    "num_steps": _integer(1),
    "teacher_steps": _integer(1),
}


def check_training(config: Any) -> None:
    """Raises `ConfigError` naming every trainer knob outside its range (`TRAINING_RULES`,
    `LEAF_RULES`); keys a config does not have are not checked."""
    problems = []
    for key in dotted_keys(config):
        leaf = key.rsplit(".", 1)[-1]
        rule = TRAINING_RULES.get(key) or LEAF_RULES.get(leaf)
        value = _get(config, key)
        if rule and not rule[0](value):
            problems.append(f"config.{key}={value!r} must be {rule[1]}")
        steps = value if isinstance(value, (list, tuple)) else [value]
        if leaf == "student_steps" and (not steps or not all(_integer(1)[0](n) for n in steps)):
            problems.append(f"config.{key}={value!r} must be integers >= 1 (at least one)")
    if problems:
        raise ConfigError("; ".join(problems))


def _get(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config
