"""LoRA students: a distilled student as low-rank factors on the frozen teacher UNet.

The student's UNet is `W + (alpha / rank) · A·B` on the targeted kernels of the base `W` (the
frozen teacher's UNet, `frozen["teacher"]["unet"]`), and the base itself elsewhere. Only the
factors (and tensors the student has and the base lacks, e.g. LCM's guidance projection) are
trainable, so the optimizer state and the EMA cover only them, and the base is held once: the
frozen argument of the compiled step that the teacher already reads.

Layouts (flax, so the product is the kernel's own layout):
  Dense kernel `(in, out)`:        a `(in, r)`,         b `(r, out)`
  Conv kernel `(kh, kw, in, out)`: a `(kh, kw, in, r)`, b `(r, out)`
`a` starts N(0, 1/fan_in) from an explicit key, `b` at zero: step 0 is the base exactly.

Factors live in a pytree mirroring the UNet's module paths, a `{"lora_a", "lora_b"}` pair at each
targeted module: `{"down_blocks_1": {"attentions_0": {... "attn1": {"to_q": {"lora_a": ...}}}}}`.
A student's trainable tree is `{"lora": factors}` plus `{"extra": tensors}` when it has any.

`adapt` turns a distillation `Method` whose params are full UNets into its LoRA version with no
change to the method's own code: each trainable UNet is materialised (`student_unet`) from the
factors and the frozen base inside the method's functions.

peft / diffusers interchange (`to_peft`, `from_peft`): `unet.<module>.lora_A.weight` `(r, in)` /
`(r, in, kh, kw)` and `unet.<module>.lora_B.weight` `(out, r)` / `(out, r, 1, 1)`, what
`pipe.load_lora_weights(DIR)` reads, with the rank and alpha in the file's adapter metadata.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from flash_jax import weights
from flash_jax.config import ConfigError

if TYPE_CHECKING:
    import ml_collections

    from flash_jax.methods import Method

Params = dict[str, Any]
Array = jax.Array

# Target group -> the module paths (flax, "/"-joined) it adapts.
TARGETS: dict[str, re.Pattern] = {
    "attention": re.compile(r"(.*/)?attn\d+/(to_q|to_k|to_v|to_out_0)"),
    "feed_forward": re.compile(r"(.*/)?ff/(net_0/proj|net_2)"),
    "resnet": re.compile(r"(.*/)?resnets_\d+/(conv1|conv2)"),
}
DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "rank": 16,
    "alpha": 16.0,
    "targets": ("attention", "feed_forward"),
}
FACTORS = ("lora_a", "lora_b")
PEFT_FILE = "pytorch_lora_weights.safetensors"  # the name load_lora_weights(DIR) looks for
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header entry for LoraConfig


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """`config.lora`: rank r, alpha (the update is scaled by alpha / r), target groups."""

    rank: int = DEFAULTS["rank"]
    alpha: float = DEFAULTS["alpha"]
    targets: tuple[str, ...] = DEFAULTS["targets"]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_section() -> ml_collections.ConfigDict:
    """The `config.lora` group of the distillation configs (LoRA off)."""
    import ml_collections

    return ml_collections.ConfigDict(
        dict(
            enabled=DEFAULTS["enabled"],  # train low-rank factors on the frozen teacher
            rank=DEFAULTS["rank"],  # r of every factor pair
            alpha=DEFAULTS["alpha"],  # the update is scaled by alpha / rank (peft's lora_alpha)
            # module groups: "attention" (attn1/attn2 to_q, to_k, to_v, to_out.0), "feed_forward"
            # (ff.net.0.proj, ff.net.2), "resnet" (resnets' conv1, conv2)
            targets=DEFAULTS["targets"],
        )
    )


def from_config(config: Any) -> LoRAConfig | None:
    """`config.lora` checked: a LoRAConfig when enabled, None when off or absent.

    Raises:
      ConfigError: naming the key, for a rank that is not an integer >= 1, an alpha that is not a
        finite number > 0, unknown or no targets, or LoRA knobs changed while `enabled` is off.
    """
    section = config.get("lora") if hasattr(config, "get") else None
    if section is None:
        return None
    values = {k: section.get(k, v) for k, v in DEFAULTS.items()}
    unknown = sorted(set(section.keys()) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"config.lora has unknown keys {unknown} (known: {sorted(DEFAULTS)})")
    targets = values["targets"]
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not isinstance(values["enabled"], bool):
        raise ConfigError(f"config.lora.enabled={values['enabled']!r} must be true or false")
    if not values["enabled"]:
        changed = [
            f"config.lora.{k}={values[k]!r}" for k in ("rank", "alpha") if values[k] != DEFAULTS[k]
        ]
        if targets != DEFAULTS["targets"]:
            changed.append(f"config.lora.targets={targets!r}")
        if changed:
            raise ConfigError(
                f"{', '.join(changed)} set but config.lora.enabled=False: add "
                "--config.lora.enabled=true to train a LoRA student"
            )
        return None
    rank, alpha = values["rank"], values["alpha"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"config.lora.rank={rank!r} must be an integer >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise ConfigError(f"config.lora.alpha={alpha!r} must be a finite number > 0")
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ConfigError(
            f"config.lora.targets={targets!r}: need one or more of {sorted(TARGETS)}"
            + (f" ({bad} unknown)" if bad else "")
        )
    return LoRAConfig(rank=rank, alpha=float(alpha), targets=targets)


# ------------------------------------------------------------------------------ pure functions


def _flat(tree: Params) -> dict[tuple[str, ...], Any]:
    return flax.traverse_util.flatten_dict(tree)


def target_modules(base: Params, targets: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Module paths of `base` (a UNet's params or their shapes) adapted by the groups `targets`:
    those with a 2-D or 4-D `kernel` whose path matches a group, sorted."""
    patterns = [TARGETS[t] for t in targets]
    found = []
    for path, leaf in _flat(base).items():
        module = "/".join(path[:-1])
        if path[-1] == "kernel" and len(leaf.shape) in (2, 4):
            if any(p.fullmatch(module) for p in patterns):
                found.append(path[:-1])
    return sorted(found)


def init_factors(base: Params, config: LoRAConfig, rng: Array) -> Params:
    """Fresh factors for the targeted modules of `base` (params or ShapeDtypeStructs): `lora_a`
    N(0, 1/fan_in) from `rng` (folded with the module's index), `lora_b` zeros; float32.

    Raises:
      ValueError: `base` has no module the targets select.
    """
    modules = target_modules(base, config.targets)
    if not modules:
        raise ValueError(f"config.lora.targets={config.targets!r} select no module of the UNet")
    flat_base = _flat(base)
    out = {}
    for i, module in enumerate(modules):
        shape = tuple(flat_base[(*module, "kernel")].shape)
        *receptive, fan_out = shape
        std = 1.0 / math.sqrt(math.prod(receptive))
        key = jax.random.fold_in(rng, i)
        out[(*module, "lora_a")] = std * jax.random.normal(key, (*receptive, config.rank))
        out[(*module, "lora_b")] = jnp.zeros((config.rank, fan_out), jnp.float32)
    return flax.traverse_util.unflatten_dict(out)


def delta(lora_a: Array, lora_b: Array) -> Array:
    """`a·b` contracted over the rank: a kernel-shaped update `(..., in, out)`."""
    return jnp.tensordot(lora_a, lora_b, axes=1)


def merge(base: Params, factors: Params, scale: float) -> Params:
    """`base` with `kernel + scale·a·b` at every module of `factors` (in float32: a low-precision
    base would round a small update away); every other tensor is `base`'s, unchanged.

    Raises:
      ValueError: a factor pair whose module is not in `base`, or whose shapes do not fit its
        kernel (naming the module and the shapes).
    """
    flat = dict(_flat(base))
    for module, pair in _modules(factors).items():
        name = "/".join(module)
        kernel = flat.get((*module, "kernel"))
        if kernel is None:
            raise ValueError(f"LoRA factors for {name}: the base UNet has no such kernel")
        a, b = pair["lora_a"], pair["lora_b"]
        if a.shape[:-1] != kernel.shape[:-1] or b.shape != (a.shape[-1], kernel.shape[-1]):
            raise ValueError(
                f"LoRA factors for {name}: lora_a {tuple(a.shape)}, lora_b {tuple(b.shape)} do "
                f"not fit the kernel {tuple(kernel.shape)}"
            )
        flat[(*module, "kernel")] = jnp.asarray(kernel, jnp.float32) + scale * delta(a, b)
    return flax.traverse_util.unflatten_dict(flat)


def _modules(factors: Params) -> dict[tuple[str, ...], dict[str, Any]]:
    """`{module path: {"lora_a": a, "lora_b": b}}` of a factor tree (both factors required)."""
    out: dict[tuple[str, ...], dict[str, Any]] = {}
    for path, leaf in _flat(factors).items():
        if path[-1] not in FACTORS:
            raise ValueError(f"LoRA factor tree has {'/'.join(path)!r}: leaves are {FACTORS}")
        out.setdefault(path[:-1], {})[path[-1]] = leaf
    for module, pair in out.items():
        if set(pair) != set(FACTORS):
            raise ValueError(f"LoRA factors for {'/'.join(module)}: has only {sorted(pair)}")
    return out


def student_unet(params: Params, base: Params, scale: float) -> Params:
    """The student's full UNet params from its trainable tree `{"lora"[, "extra"]}` and the base:
    `merge(base, lora, scale)` with the `extra` tensors added (ones the base lacks)."""
    merged = merge(base, params["lora"], scale)
    if "extra" not in params:
        return merged
    flat = dict(_flat(merged))
    for path, value in _flat(params["extra"]).items():
        if path in flat:
            raise ValueError(f"LoRA student extra tensor {'/'.join(path)} is also in the base")
        flat[path] = value
    return flax.traverse_util.unflatten_dict(flat)


def init_student(
    student_abstract: Params, base_abstract: Params, config: LoRAConfig, rng: Array
) -> Params:
    """A student's trainable tree: factors on the base (`init_factors`), and zeros for the
    tensors of `student_abstract` the base lacks (the rule of `common.student_from_teacher`).

    Raises:
      ValueError: a tensor both have with different shapes, or one only the base has.
    """
    student, base = _flat(student_abstract), _flat(base_abstract)
    missing = sorted("/".join(p) for p in set(base) - set(student))
    reshaped = sorted(
        f"{'/'.join(p)}: student {tuple(v.shape)} vs base {tuple(base[p].shape)}"
        for p, v in student.items()
        if p in base and tuple(v.shape) != tuple(base[p].shape)
    )
    if missing or reshaped:
        raise ValueError(
            f"a LoRA student must have every tensor of its base at the base's shape: "
            f"missing {missing[:5]}, reshaped {reshaped[:5]}"
        )
    out: Params = {"lora": init_factors(base_abstract, config, rng)}
    extra = {p: jnp.zeros(v.shape, v.dtype) for p, v in student.items() if p not in base}
    if extra:
        out["extra"] = flax.traverse_util.unflatten_dict(extra)
    return out


def num_params(tree: Params) -> int:
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------ Method adapter


def base_unet(frozen: Mapping[str, Any]) -> Params:
    """The base of every distillation's LoRA student: the frozen teacher's UNet."""
    return frozen["teacher"]["unet"]


def adapt(
    method: Method,
    config: LoRAConfig,
    students: Mapping[str, Params],
    base_abstract: Params,
) -> Method:
    """The LoRA version of a distillation `method` whose trainable params are full UNets.

    Args:
      method: params `{key: UNet params}` for the keys of `students`; the base each is built on is
        `base_unet(frozen)`. Its `post_update`, if any, must act leaf-wise on those subtrees
        (LCM's EMA target): it then acts on the factors unchanged.
      config: the LoRA knobs.
      students: `{key: abstract params of that UNet}` (`jax.ShapeDtypeStruct` leaves).
      base_abstract: the base UNet's abstract params.

    Returns:
      The Method with params `{key: {"lora"[, "extra"]}}`, every key initialised alike from the
      same key (LCM's target starts as a copy of the student, as in the full method); the
      method's functions see the materialised UNets (`student_unet`).
    """
    keys = tuple(students)

    def init(rng: Array) -> Params:
        return {k: init_student(students[k], base_abstract, config, rng) for k in keys}

    def full(params: Params, frozen: Any) -> Params:
        base = base_unet(frozen)
        return {k: student_unet(params[k], base, config.scale) for k in keys}

    def generator_loss(params, frozen, batch, rng, disc_params=None):
        return method.generator_loss(full(params, frozen), frozen, batch, rng, disc_params)

    def on_full(fn: Callable | None) -> Callable | None:
        if fn is None:
            return None
        return lambda params, frozen, *args, **kw: fn(full(params, frozen), frozen, *args, **kw)

    return dataclasses.replace(
        method,
        init=init,
        generator_loss=generator_loss,
        sample=on_full(method.sample),
        generate=on_full(method.generate),
    )


def maybe_adapt(
    method: Method,
    config: ml_collections.ConfigDict,
    students: Callable[[], Mapping[str, Params]],
    base_abstract: Callable[[], Params],
) -> Method:
    """`adapt(method, ...)` when `config.lora.enabled`, else `method` (abstract trees are only
    computed for a LoRA student)."""
    lora_config = from_config(config)
    if lora_config is None:
        return method
    return adapt(method, lora_config, students(), base_abstract())


# ------------------------------------------------------------------------------ peft / diffusers


def _torch_module(module: tuple[str, ...]) -> str:
    """`('down_blocks_1', ..., 'to_out_0')` -> `'down_blocks.1....to_out.0'` (diffusers' name)."""
    return weights.flax_path_to_torch_name((*module, "kernel")).removesuffix(".weight")


def to_peft(factors: Params, config: LoRAConfig, prefix: str = "unet") -> tuple[dict, dict]:
    """`(state dict, safetensors metadata)` in the layout diffusers' `load_lora_weights` reads:
    `{prefix}.<module>.lora_A.weight` `(r, in)` / `(r, in, kh, kw)`, `...lora_B.weight`
    `(out, r)` / `(out, r, 1, 1)` (numpy float32), and the peft `LoraConfig` (r, lora_alpha,
    target_modules) under the `lora_adapter_metadata` header entry."""
    state, modules = {}, []
    for module, pair in sorted(_modules(factors).items()):
        a, b = (np.asarray(jax.device_get(pair[f]), np.float32) for f in FACTORS)
        name = _torch_module(module)
        modules.append(name)
        if a.ndim == 2:
            state[f"{prefix}.{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
            state[f"{prefix}.{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
        else:  # Conv: A is a conv with the kernel's window, B a 1x1 conv
            state[f"{prefix}.{name}.lora_A.weight"] = np.ascontiguousarray(a.transpose(3, 2, 0, 1))
            state[f"{prefix}.{name}.lora_B.weight"] = np.ascontiguousarray(b.T[:, :, None, None])
    adapter = {"r": config.rank, "lora_alpha": config.alpha, "target_modules": modules}
    metadata = {f"{prefix}.{k}": v for k, v in adapter.items()}
    return state, {"format": "pt", METADATA_KEY: json.dumps(metadata, sort_keys=True)}


def from_peft(
    state: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None, base: Params
) -> tuple[Params, LoRAConfig]:
    """Inverse of `to_peft` for the `unet.` entries: `(factors, LoRAConfig)`, checked against the
    base UNet `base` (params or shapes). Alpha comes from the metadata; without it, alpha = rank
    (peft's convention for files without one). `targets` of the result is every group.

    Raises:
      weights.WeightsError: a name that is not a LoRA factor of a base module, a missing factor,
        or shapes that do not fit the base kernel (naming the tensor and both shapes).
    """
    flat_base = _flat(base)
    by_name = {_torch_module(p[:-1]): p[:-1] for p in flat_base if p[-1] == "kernel"}
    pattern = re.compile(r"unet\.(.+)\.lora_([AB])\.weight")
    pairs: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    problems = []
    for name, value in state.items():
        m = pattern.fullmatch(name)
        if m is None or m.group(1) not in by_name:
            problems.append(f"unexpected {name!r} shape {tuple(np.shape(value))}")
            continue
        pairs.setdefault(by_name[m.group(1)], {})[m.group(2)] = np.asarray(value, np.float32)
    flat, ranks = {}, set()
    for module, pair in sorted(pairs.items()):
        name = _torch_module(module)
        kernel = tuple(flat_base[(*module, "kernel")].shape)
        if set(pair) != {"A", "B"}:
            problems.append(f"{name}: has only lora_{''.join(sorted(pair))}")
            continue
        a, b = pair["A"], pair["B"]
        if len(kernel) == 2 and a.ndim == 2 and b.ndim == 2:
            a, b = a.T, b.T
        elif len(kernel) == 4 and a.ndim == 4 and b.ndim == 4 and b.shape[2:] == (1, 1):
            a, b = a.transpose(2, 3, 1, 0), b[:, :, 0, 0].T
        else:
            a = b = None
        if a is None or a.shape[:-1] != kernel[:-1] or b.shape != (a.shape[-1], kernel[-1]):
            problems.append(
                f"{name}: lora_A {tuple(pair['A'].shape)}, lora_B {tuple(pair['B'].shape)} do "
                f"not fit the kernel {kernel} (flax layout)"
            )
            continue
        ranks.add(a.shape[-1])
        flat[(*module, "lora_a")], flat[(*module, "lora_b")] = a, b
    if not problems and len(ranks) != 1:
        problems.append(f"expected one rank for every module, found {sorted(ranks) or 'none'}")
    if problems:
        raise weights.WeightsError(
            f"LoRA file: {len(problems)} problem(s):\n  " + "\n  ".join(problems)
        )
    rank = ranks.pop()
    adapter = json.loads((metadata or {}).get(METADATA_KEY, "{}"))
    alpha = float(adapter.get("unet.lora_alpha", rank))
    config = LoRAConfig(rank=rank, alpha=alpha, targets=tuple(TARGETS))
    return flax.traverse_util.unflatten_dict(flat), config


def save_peft(path: str, factors: Params, config: LoRAConfig) -> None:
    """Writes `to_peft(factors, config)` to the safetensors file `path`."""
    from safetensors.numpy import save_file

    state, metadata = to_peft(factors, config)
    save_file(state, path, metadata)


def load_peft(path: str, base: Params) -> tuple[Params, LoRAConfig]:
    """`from_peft` of the safetensors file `path` (e.g. `DIR/pytorch_lora_weights.safetensors`)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(path, framework="numpy") as f:
        metadata = f.metadata()
    return from_peft(load_file(path), metadata, base)


def full_unet(unet: Params, config: Any, load_base: Callable[[], Params]) -> Params:
    """A checkpoint's `params["unet"]` as full UNet params (numpy): a LoRA student's tree
    `{"lora"[, "extra"]}` merged onto `load_base()` (its run's frozen teacher UNet) with the run
    config's `config.lora`; full params as they are.

    Raises:
      ValueError: LoRA factors in a run whose `config.lora.enabled` is off.
    """
    if "lora" not in unet:
        return unet
    lora_config = from_config(config)
    if lora_config is None:
        raise ValueError("the checkpoint holds LoRA factors but its config.lora.enabled is off")
    merged = student_unet(unet, load_base(), lora_config.scale)
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), merged)
