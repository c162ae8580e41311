"""Helpers shared by the benchmark scripts: timing, the machine's matmul peak and copy bandwidth,
XLA cost / memory analysis, model configs (testbed-free: no ml_collections needed), random frozen
models served in memory, and the JSON output.

Everything here runs on jax 0.10 (CPU) and 0.11 (GPU) with only jax, flax, optax, orbax and numpy:
the GPU machines have no ml_collections, grain or TFDS.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flash_jax import methods, sampling
from flash_jax.methods import Method
from flash_jax.models import autoencoder
from flash_jax.t2i import T2I
from flash_jax.train import checkpoint
from flash_jax.train import state as state_lib

RESULTS = Path(__file__).parent / "results"


class Config(dict):
    """The part of `ml_collections.ConfigDict` that `T2I.from_config`, the methods' `make` and
    `loop.make_optimizer` read: attribute access (nested dicts come back as `Config`) and
    `to_dict()`. Lets the benchmarks build SD-size configs on machines without ml_collections."""

    def __getattr__(self, name: str) -> Any:
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(f"config has no field {name!r}") from None
        return Config(value) if isinstance(value, dict) and not isinstance(value, Config) else value

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(dict(self))


# ------------------------------------------------------------------------------------ timing


def timed(fn: Callable, *args: Any, iters: int, warmup: int = 1) -> dict[str, float]:
    """Times `fn(*args)` (blocking on its output): `first_s` (the first call, i.e. trace + compile
    + one run for a fresh jitted function), then `iters` calls after `warmup - 1` more:
    median / min / mean milliseconds. A fixed number of calls, never a time-based loop."""
    call = functools.partial(fn, *args)
    first_s = first_call_s(call)
    for _ in range(warmup - 1):
        jax.block_until_ready(call())
    return {"first_s": first_s} | summary(interleaved({"": call}, iters=iters)[""])


def first_call_s(call: Callable[[], Any]) -> float:
    """Seconds of one call, blocking on its output: for a fresh jitted function, trace + compile +
    one run."""
    start = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - start


def interleaved(
    calls: dict[str, Callable[[], Any]], *, iters: int, stop: Callable[[], bool] = lambda: False
) -> dict[str, list[float]]:
    """Milliseconds of `iters` rounds, each calling every one of `calls` once in turn (blocking on
    its output). Programs compared by a ratio then see the same machine: on a shared box the speed
    drifts by ±15 % over a minute, and timing one program after the other puts that drift into the
    ratio. `stop()` is asked after each round (a time budget); at least one round runs."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(iters):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append((time.perf_counter() - start) * 1e3)
        if stop():
            break
    return times


def interleaved_repeats(
    calls: dict[str, Callable[[], Any]],
    *,
    iters: int,
    repeats: int,
    stop: Callable[[], bool] = lambda: False,
) -> list[dict[str, list[float]]]:
    """`repeats` blocks of `iters` interleaved rounds each. A ratio between programs is computed
    once per block (`ratio_spread`), so its spread over the blocks shows the run-to-run noise."""
    blocks = []
    for _ in range(max(repeats, 1)):
        blocks.append(interleaved(calls, iters=iters, stop=stop))
        if stop():
            break
    return blocks


def merged(blocks: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Every block's milliseconds of each program, in one list per program."""
    return {name: [t for block in blocks for t in block[name]] for name in blocks[0]}


def ratio_spread(
    blocks: list[dict[str, list[float]]], numerator: list[str], denominator: list[str]
) -> dict[str, Any]:
    """The ratio (sum of the `numerator` programs' median ms) / (same for `denominator`) in each
    block: its median, min and max over the blocks and every value. A claim that the ratio is on
    one side of a bar holds only when the whole range is."""
    values = [
        sum(statistics.median(b[n]) for n in numerator)
        / sum(statistics.median(b[d]) for d in denominator)
        for b in blocks
    ]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "repeats": len(values),
        "values": values,
    }


def summary(times_ms: list[float]) -> dict[str, float]:
    """Median / min / mean of a list of milliseconds, and how many there are (`iters`)."""
    return {
        "median_ms": statistics.median(times_ms),
        "min_ms": min(times_ms),
        "mean_ms": statistics.fmean(times_ms),
        "iters": len(times_ms),
    }


def matmul_peak(n: int, iters: int, dtype: Any = jnp.bfloat16) -> dict[str, float]:
    """The measured dense matmul rate: `(n, n) @ (n, n)` in `dtype`, median of `iters` calls."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    stats = timed(jax.jit(jnp.dot), a, b, iters=iters, warmup=2)
    flops = 2.0 * n**3
    return {
        "n": n,
        "dtype": jnp.dtype(dtype).name,
        "median_ms": stats["median_ms"],
        "tflops": flops / (stats["median_ms"] * 1e-3) / 1e12,
        "tflops_best": flops / (stats["min_ms"] * 1e-3) / 1e12,
    }


def copy_bandwidth(nbytes: int, iters: int) -> dict[str, float]:
    """Device memory bandwidth from `x + 1` on a float32 array of `nbytes` (reads and writes it
    once: 2·nbytes moved per call), median of `iters` calls."""
    x = jnp.zeros((nbytes // 4,), jnp.float32)
    stats = timed(jax.jit(lambda v: v + 1.0), x, iters=iters, warmup=2)
    moved = 2.0 * x.size * 4
    return {
        "bytes": int(x.size * 4),
        "median_ms": stats["median_ms"],
        "gb_per_s": moved / (stats["median_ms"] * 1e-3) / 1e9,
    }


# ----------------------------------------------------------------------- XLA cost / memory


def _first(analysis: Any) -> dict[str, float]:
    # jax returns a dict (newer) or a one-element list of dicts (older) or None.
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    return dict(analysis or {})


def flops_of(lowered_or_compiled: Any) -> float:
    """FLOPs XLA's cost analysis counts for a lowered or compiled program (0.0 if unavailable).
    XLA counts the body of a `while` loop (`lax.scan`) ONCE whatever its trip count: see
    `loops_counted_once` and correct with the trip counts the caller knows."""
    return float(_first(lowered_or_compiled.cost_analysis()).get("flops", 0.0))


def loops_counted_once() -> bool:
    """Whether this backend's cost analysis counts a scan's body once (True on XLA CPU and GPU
    as of jax 0.10 / 0.11). Probed on a 3-step scan of a matmul, so a future XLA that multiplies
    by the trip count is detected instead of double-corrected."""

    def three(x):
        return jax.lax.scan(lambda c, _: (c @ c, None), x, None, length=3)[0]

    x = jnp.ones((64, 64))
    one_step = 2.0 * 64**3
    return flops_of(jax.jit(three).lower(x).compile()) < 2 * one_step


def memory_of(compiled: Any) -> dict[str, int]:
    """`compiled.memory_analysis()` as a dict of bytes, plus `total_bytes` = arguments + outputs
    + temporaries − aliased (donated) buffers: the live device memory the program needs."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    keys = ("argument", "output", "temp", "alias", "generated_code")
    out = {f"{k}_bytes": int(getattr(stats, f"{k}_size_in_bytes", 0)) for k in keys}
    out["total_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    )
    return out


def device_peak_bytes() -> int | None:
    """The allocator's peak bytes in use on device 0 so far (GPU/TPU; None on CPU)."""
    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


# ----------------------------------------------------------------------------- models


def sd15_config(
    *,
    tiny: bool = False,
    dtype: str = "bfloat16",
    param_dtype: str = "bfloat16",
    remat: bool = True,
    batch_size: int = 8,
    student_steps: tuple[int, ...] = (3,),
    teacher_steps: int = 2,
    guidance_scale: float = 7.5,
) -> Config:
    """An Imagine Flash training config at Stable Diffusion 1.5 size for random weights: the
    published SD1.5 UNet, CLIP ViT-L/14 text encoder and SD VAE of configs/sd/common.py (copied as
    plain dicts, since that module needs ml_collections; tests/test_benchmarks.py checks that they
    parse to the same models), 512×512 images, 64×64×4 latents, 77 tokens.
    `tiny`: the same structure at toy width (16×16 images, 8×8 latents) for CPU smoke tests.
    `dtype`: compute dtype of the UNet and text encoder (`config.model.dtype`) and of the VAE;
    `param_dtype`: parameter dtype of the UNet and the VAE."""
    if tiny:
        unet_channels, heads, cross, groups, layers = (32, 64), 2, 32, 8, 1
        down = ["CrossAttnDownBlock2D", "DownBlock2D"]
        up = ["UpBlock2D", "CrossAttnUpBlock2D"]
        text = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            projection_dim=32,
        )
        vae_channels, vae_layers, image_size = (8, 16), 1, 16
    else:
        unet_channels, heads, cross, groups, layers = (320, 640, 1280, 1280), 8, 768, 32, 2
        down = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
        up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
        text = dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            projection_dim=768,
        )
        vae_channels, vae_layers, image_size = (128, 256, 512, 512), 2, 512
    unet = dict(
        sample_size=image_size // 2 ** (len(vae_channels) - 1),
        down_block_types=down,
        up_block_types=up,
        block_out_channels=list(unet_channels),
        layers_per_block=layers,
        attention_head_dim=heads,
        cross_attention_dim=cross,
        norm_num_groups=groups,
        param_dtype=jnp.dtype(param_dtype),
    )
    text |= dict(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        eos_token_id=2,  # transformers' legacy rule: pool at the largest id
        layer_norm_eps=1e-5,
    )
    autoencoder = dict(
        down_block_types=["DownEncoderBlock2D"] * len(vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(vae_channels),
        block_out_channels=list(vae_channels),
        layers_per_block=vae_layers,
        latent_channels=4,
        norm_num_groups=min(32, vae_channels[0]),
        sample_size=image_size,
        scaling_factor=0.18215,
        dtype=jnp.dtype(dtype),
        param_dtype=jnp.dtype(param_dtype),
    )
    schedule = dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        num_train_timesteps=1000,
        rescale_betas_zero_snr=False,
        prediction_type="epsilon",
    )
    optimizer = dict(
        learning_rate=1e-5,
        warmup_steps=1,
        grad_clip=1.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
    )
    # The student's sampler (grids, evaluation), as configs/sd/common.py sets it.
    sample = sampling.SamplerConfig(num_steps=max(student_steps), noise_correction=True)
    return Config(
        method="imagine_flash",
        batch_size=batch_size,
        ema_decay=0.999,
        model=dict(unet=unet, text=text, autoencoder=autoencoder, dtype=dtype, remat=remat),
        schedule=schedule,
        data=dict(image_size=image_size),
        teacher_workdir="memory://teacher",
        autoencoder_workdir="memory://vae",
        optimizer=optimizer,
        disc_optimizer=dict(optimizer),
        imagine_flash=dict(
            student_steps=list(student_steps),
            backward=True,
            rollout_noise_correction=True,
            srl=True,
            gamma="affine",
            gamma_a=0.75,
            gamma_b=0.0,
            gamma_shift=0.5,
            gamma_jitter=0.0,
            srl_noise="fresh",
            teacher_steps=teacher_steps,
            teacher_sampler="ddim",
            guidance_scale=guidance_scale,
            guidance_rescale=0.0,
            loss_weighting="uniform",
            adv_weight=0.1,
            disc_width=64 if not tiny else 8,
            disc_t_max=750,
        ),
        sample=dataclasses.asdict(sample),
    )


def init_autoencoder(model: T2I, rng: jax.Array) -> Any:
    """Random VAE params for `model` with the model's own init (jitted)."""
    return jax.jit(functools.partial(autoencoder.init_params, model.autoencoder))(rng)


def random_like(abstract: Any, seed: int, std: float = 0.02) -> Any:
    """Arrays shaped like the `jax.ShapeDtypeStruct` tree `abstract`, N(0, std²), drawn on the
    host and copied to the device. For speed measurements at SD size, where compiling the models'
    own init (one program per model, hundreds of distinct kernels) costs minutes on a GPU and the
    values do not change the cost of any later computation."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        values = rng.standard_normal(leaf.shape, np.float32) * np.float32(std)
        return jax.device_put(values.astype(leaf.dtype))

    return jax.tree.map(draw, abstract)


@contextlib.contextmanager
def frozen_in_memory(trees: dict[str, Any]) -> Iterator[None]:
    """Serves `checkpoint.load_params(path)` from `trees` (path -> params) while active, so a
    method's `init` / `load_frozen` / `init_discriminator` run unchanged on random in-memory
    weights: no SD-size files written and read back. Other paths still go to disk."""
    original = checkpoint.load_params

    def load_params(workdir: Any, field: str = "ema_params") -> Any:
        return trees[str(workdir)] if str(workdir) in trees else original(workdir, field)

    checkpoint.load_params = load_params
    try:
        yield
    finally:
        checkpoint.load_params = original


def _frozen_paths(config: Any, teacher: Any, vae: Any) -> dict[str, Any]:
    return {str(config.teacher_workdir): teacher, str(config.autoencoder_workdir): vae}


def imagine_flash_frozen(config: Any, teacher: Any, vae: Any) -> Any:
    """The method's `load_frozen()` served from the in-memory `teacher` / `vae` trees."""
    with frozen_in_memory(_frozen_paths(config, teacher, vae)):
        # A fresh method each time: its loaders memoise what they return.
        return methods.get(config.method)(config).load_frozen()


def imagine_flash_state(
    config: Any,
    tx: optax.GradientTransformation,
    disc_tx: optax.GradientTransformation,
    rng: jax.Array,
    teacher: Any,
    vae: Any,
) -> state_lib.TrainState:
    """The Imagine Flash TrainState at step 0 (student = a copy of the teacher, fresh
    discriminator), built by the method's own `init` (from the in-memory `teacher` / `vae` trees)
    and `init_discriminator` (which reads no weights: the heads' input shapes come from abstract
    teacher features). Call it on arrays (the student gets fresh buffers: the step donates its
    state), or `jax.eval_shape` it on `jax.ShapeDtypeStruct`s for an abstract state."""
    with frozen_in_memory(_frozen_paths(config, teacher, vae)):
        method = methods.get(config.method)(config)  # fresh: its loaders memoise
        params = jax.device_put(method.init(rng), may_alias=False)
    disc = None
    if method.init_discriminator is not None:
        disc = jax.jit(method.init_discriminator)(rng)
    own_rng = jax.device_put(rng, may_alias=False)  # the step donates its state, key included
    return state_lib.init_state(params, tx, own_rng, disc, disc_tx if disc is not None else None)


def imagine_flash_batch(
    method: Method, model: T2I, batch_size: int, image_size: int, cached: bool = False
) -> dict[str, Any]:
    """A prepared batch (content does not change the cost): black images and one caption, or with
    `cached` what the latent cache (flash_jax/data/cache.py) feeds an SD run instead of images:
    float16 VAE posterior mean/std and prompt embeddings, so neither the VAE encoder nor the text
    encoder runs in the step."""
    b = batch_size
    raw: dict[str, Any] = {"caption": ["a red circle and a blue square"] * b}
    if cached:
        h, w, c = model.latent_shape(b, image_size)[1:]
        d = model.unet.cross_attention_dim[0]
        raw["latent_mean"] = np.zeros((b, h, w, c), np.float16)
        raw["latent_std"] = np.full((b, h, w, c), 0.1, np.float16)
        raw["prompt_embeds"] = np.zeros((b, model.max_length, d), np.float16)
        raw["pooled_prompt_embeds"] = np.zeros((b, model.text.hidden_size), np.float16)
    else:
        raw["image"] = np.zeros((b, image_size, image_size, 3), np.uint8)
    return method.prepare_batch(raw)


# ------------------------------------------------------------------------------ output


def platform_info() -> dict[str, Any]:
    devices = jax.devices()
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind,
        "cpu_count": os.cpu_count(),
        "matmul_precision": jax.config.jax_default_matmul_precision,
    }


def write_json(result: dict[str, Any], name: str, out: str | None = None) -> Path:
    """Writes `result` to `out`, else `$OUT/<name>` when $OUT is set, else benchmarks/results/."""
    if out:
        path = Path(out)
    elif os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / name
    else:
        path = RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=_json_default))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, jax.Array)):
        return np.asarray(value).tolist()
    return str(value)


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A markdown table (what docs/performance.md pastes)."""
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
