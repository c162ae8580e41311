"""Parameter counts of the configs/sd models and the training state they imply (no weights needed),
and XLA's per-device memory analysis of the compiled SD1.5 Imagine Flash step on its default mesh.

  python -m benchmarks.sd_state_size [--out benchmarks/results/sd_state_size.json]
      [--lora_ranks 4,16,64]
  python -m benchmarks.sd_state_size --memory [--devices=8] [--variant ""]
      [--memory_out benchmarks/results/sd15_step_memory.json]
  python -m benchmarks.sd_state_size --memory --presets [--models sd15,sdxl]
      [--presets_out benchmarks/results/sd_preset_memory.json]
  python -m benchmarks.sd_state_size --memory --presets --lora 16 [--models sd15]
      [--machines tpu_v5e_8] [--presets_out benchmarks/results/sd_preset_memory_lora.json]

Counts come from abstract initialisation (`jax.eval_shape`) of the configs' model dicts. Bytes:
the trained student UNet keeps float32 parameters, two Adam moments and an EMA copy (16 B/param);
the frozen teacher UNet, text encoder(s) and VAE are held as loaded (float32, 4 B/param). The
per-device column divides everything by 8 (fsdp=8: state and frozen models fully sharded). A LoRA
student (flash_jax/lora.py, default targets: attention and feed-forward) trains only its factors:
"lora_r<R>" is their count at rank R (16 B each in the state), for the SD models and the testbed's
UNet ("shapes", configs/shapes/imagine_flash.py).
Activations and the discriminator heads come on top. Prints a markdown table and writes JSON.

--memory: the fused training step of configs/sd/sd15_imagine_flash.py (state donated, frozen
models and a cached-latent batch as inputs) is lowered and compiled ahead of time on `--devices`
simulated CPU devices, from ShapeDtypeStructs that carry the shardings `loop.place` would give them
on the config's mesh (the default: data=-1, i.e. 8-way data parallel). `memory_analysis()` of that
executable is per device (one SPMD partition); XLA:CPU's buffer assignment stands in for the
accelerator's, so the numbers are a guide, not a GPU/TPU measurement.

--presets: the same analysis for every machine preset of configs/sd/common.py (`HBM_GIB`) of each
model, one compile each; per preset the JSON holds "peak_gib" (the peak estimate, per device) and
"hbm_gib" (the chip's memory), rewritten after every compile. `--lora R`: the same presets with a
rank-R LoRA student (`config.lora`, default targets; flash_jax/lora.py): the state is the factors,
their Adam moments and EMA, the base is the frozen teacher's UNet; rows keyed `model:preset:rR`. LLVM's optimisation passes are off
(`--xla_backend_optimization_level=0`): they only change the generated code, not the buffers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--memory" in sys.argv:  # the device count is fixed when jax initialises its backend
    devices = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")), "8")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    )
    if "--presets" in sys.argv:
        os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

from configs.sd import common as sd_common
from configs.sd import sd15_imagine_flash, sd21_imagine_flash, sdxl_imagine_flash
from configs.shapes import imagine_flash as shapes_imagine_flash
from flash_jax import lora, methods, parallel
from flash_jax.data import cache
from flash_jax.models import autoencoder, text, unet
from flash_jax.t2i import T2I
from flash_jax.train import loop
from flash_jax.train import state as state_lib
from flash_jax.train import step as step_lib

CONFIGS = {"sd15": sd15_imagine_flash, "sd21": sd21_imagine_flash, "sdxl": sdxl_imagine_flash}


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def parameter_counts(config) -> dict[str, int]:
    """`{"unet", "text", "autoencoder"}` parameter counts (text: all text encoders together)."""
    key = jax.random.key(0)
    unet_cfg = unet.UNetConfig.from_diffusers(config.model.unet.to_dict())
    out = {"unet": count(jax.eval_shape(lambda: unet.init_params(unet_cfg, key, sample_size=8)))}
    out["text"] = 0
    for part in ("text", "text_2"):
        if part in config.model:
            cfg = text.CLIPTextConfig.from_transformers(config.model[part].to_dict())
            init = lambda cfg=cfg, p=part: text.init_params(cfg, key, p == "text_2")  # noqa: E731
            out["text"] += count(jax.eval_shape(init))
    vae_cfg = autoencoder.AutoencoderConfig.from_diffusers(config.model.autoencoder.to_dict())
    out["autoencoder"] = count(jax.eval_shape(lambda: autoencoder.init_params(vae_cfg, key)))
    return out


def lora_counts(config, ranks: list[int]) -> dict[str, int]:
    """`{"lora_r<R>": trainable factor count}` of a LoRA student of `config`'s UNet (default
    targets), per rank."""
    unet_cfg = unet.UNetConfig.from_diffusers(config.model.unet.to_dict())
    base = jax.eval_shape(lambda: unet.init_params(unet_cfg, jax.random.key(0), sample_size=8))
    out = {}
    for rank in ranks:
        cfg = lora.LoRAConfig(rank=rank, alpha=float(rank), targets=lora.DEFAULTS["targets"])
        factors = jax.eval_shape(lambda c=cfg: lora.init_factors(base, c, jax.random.key(0)))
        out[f"lora_r{rank}"] = count(factors)
    return out


MEMORY_FIELDS = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "temp_size_in_bytes",
    "generated_code_size_in_bytes",
)


def abstract_step_inputs(config, mesh: jax.sharding.Mesh):
    """(jitted step, abstract state, abstract frozen, abstract batch) of `config`'s Imagine Flash
    run on `mesh`, every input a ShapeDtypeStruct with the sharding `loop.place` gives it.

    Mirrors `loop.place` without reading weights: the frozen teacher `{"unet", "text"}` and VAE
    are `eval_shape`d fresh inits (cast to `config.frozen_dtype`), and the student's params are the
    teacher UNet's (Imagine Flash's `init`). The batch is one global batch of the latent cache
    (`cache.feature_shapes`, float16 as the cache job writes by default).
    """
    rules = parallel.rules_from_config(config.sharding_rules, mesh)
    method = methods.get(config.method)(config)
    model = T2I.from_config(config)
    key = jax.random.PRNGKey(0)
    teacher = jax.eval_shape(model.init, key)
    vae = jax.eval_shape(lambda k: autoencoder.init_params(model.autoencoder, k), key)
    frozen = jax.eval_shape(
        lambda t: parallel.cast_floats(t, config.frozen_dtype), {"teacher": teacher, "vae": vae}
    )
    # A full student starts as the teacher's UNet; a LoRA student's init is abstract already.
    params = jax.eval_shape(method.init, key) if config.lora.enabled else {"unet": teacher["unet"]}
    tx = loop.make_optimizer(config.optimizer)
    disc_tx = loop.make_optimizer(config.disc_optimizer)
    disc = jax.eval_shape(method.init_discriminator, key)
    state = jax.eval_shape(
        lambda p, r, d: state_lib.init_state(p, tx, r, d, disc_tx), params, key, disc
    )

    def shardings(tree):
        return parallel.tree_shardings(
            tree, mesh, rules, method.logical_axes(), config.fsdp_min_size
        )

    state_sharding, frozen_sharding = shardings(state), shardings(frozen)
    batch_sharding = parallel.batch_sharding(mesh)
    shapes = cache.feature_shapes(model, config.data.image_size, text=True)
    batch = {
        k: jax.ShapeDtypeStruct(
            (config.batch_size, *shape),
            np.int32 if k == "tokens" else np.float16,
            sharding=batch_sharding,
        )
        for k, shape in shapes.items()
    }
    train_step = step_lib.make_train_step(method, tx, ema_decay=config.ema_decay, disc_tx=disc_tx)
    step = step_lib.compile_train_step(
        parallel.with_rules(train_step, mesh, rules),
        state_sharding,
        frozen_sharding,
        batch_sharding,
    )
    return (
        step,
        parallel.with_shardings(state, state_sharding),
        parallel.with_shardings(frozen, frozen_sharding),
        batch,
    )


def tree_bytes_per_device(tree) -> int:
    """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shard)) * np.dtype(x.dtype).itemsize
    return total


def _abstract_tokenizer(self: T2I):
    """Without a tokenizer folder (no weights here), SDXL's stacked ids `(B, 2, L)` come from two
    testbed word tokenizers: only their shape reaches the compiled step."""
    from flash_jax.data.tokenizer import WordTokenizer
    from flash_jax.t2i import StackedTokenizer

    word = WordTokenizer(max_length=self.max_length)
    return StackedTokenizer([word, word]) if self.text_2 else word


def step_memory(config) -> dict:
    """Lowers and compiles `config`'s step on its mesh (at the model's native image size when
    `config.data.image_size` is 0); `memory_analysis()` per device, the sharded input sizes and
    the lower / compile times."""
    if not config.data.image_size:
        config.data.image_size = cache.native_image_size(T2I.from_config(config))
    mesh = parallel.make_mesh(config.mesh)
    if not config.model.pretrained:
        T2I.tokenizer = _abstract_tokenizer
    step, state, frozen, batch = abstract_step_inputs(config, mesh)
    start = time.perf_counter()
    lowered = step.lower(state, frozen, batch)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start - lower_s
    analysis = compiled.memory_analysis()
    row = {f: int(getattr(analysis, f)) for f in MEMORY_FIELDS}
    # Live at the peak, per device: inputs + outputs not aliased to a donated input + temporaries.
    row["peak_estimate_bytes"] = (
        row["argument_size_in_bytes"]
        + row["output_size_in_bytes"]
        - row["alias_size_in_bytes"]
        + row["temp_size_in_bytes"]
    )
    return {
        "mesh": dict(mesh.shape),
        "global_batch": config.batch_size,
        "image_size": config.data.image_size,
        "frozen_dtype": config.frozen_dtype,
        "remat": config.model.remat,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "per_device_bytes": row,
        "per_device_input_bytes": {
            "state": tree_bytes_per_device(state),
            "frozen": tree_bytes_per_device(frozen),
            "batch": tree_bytes_per_device(batch),
        },
    }


def memory(variant: str, out: Path) -> None:
    """AOT lower + compile the SD1.5 step on the config's mesh; print and write the analysis."""
    config = sd15_imagine_flash.get_config(variant)
    record = step_memory(config)
    print(
        f"SD1.5 Imagine Flash step, variant {variant or 'default'}: mesh {record['mesh']} on "
        f"{jax.device_count()} {jax.devices()[0].platform} devices, global batch "
        f"{config.batch_size}, {config.data.image_size} px, student steps "
        f"{tuple(config.imagine_flash.student_steps)}, teacher steps "
        f"{config.imagine_flash.teacher_steps}, model dtype {config.model.dtype}, frozen "
        f"{config.frozen_dtype}, remat {config.model.remat}; lower {record['lower_s']:.0f} s, "
        f"compile {record['compile_s']:.0f} s"
    )
    print("| memory_analysis field (per device) | GiB |")
    print("|---|---|")
    for name, value in record["per_device_bytes"].items():
        print(f"| {name} | {value / 2**30:.2f} |")
    for name, value in record["per_device_input_bytes"].items():
        print(f"| input {name} (sharded shapes) | {value / 2**30:.2f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "config": "configs/sd/sd15_imagine_flash.py",
        "variant": variant,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind} (simulated)",
        "jax": jax.__version__,
        **record,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")


def presets(models: list[str], out: Path, machines: list[str], lora_rank: int = 0) -> None:
    """`step_memory` of the machine presets `machines` of `models` (a LoRA student of rank
    `lora_rank` when > 0); prints a markdown row per preset and rewrites `out` after each (rows
    already in `out` for other presets are kept)."""
    rows = json.loads(out.read_text()) if out.is_file() else {}
    print("| config | preset | mesh (data, fsdp, tensor) | global batch | peak GiB / device "
          "| chip GiB | share |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name in models:
        for machine in machines:
            hbm = sd_common.HBM_GIB[machine]
            config = CONFIGS[name].get_config(machine)
            key, overrides = f"{name}:{machine}", ""
            if lora_rank:
                config.lora.update(enabled=True, rank=lora_rank, alpha=float(lora_rank))
                key += f":r{lora_rank}"
                overrides = f" --config.lora.enabled=true --config.lora.rank={lora_rank}"
            record = step_memory(config)
            peak = record["per_device_bytes"]["peak_estimate_bytes"] / 2**30
            rows[key] = {
                "config": f"configs/sd/{name}_imagine_flash.py:{machine}{overrides}",
                "peak_gib": round(peak, 2),
                "hbm_gib": hbm,
                "fits": peak <= 0.9 * hbm,
                "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind} (simulated)",
                "jax": jax.__version__,
                **record,
            }
            mesh = tuple(record["mesh"].values())
            print(f"| {key} | {machine} | {mesh} | {config.batch_size} | {peak:.1f} | {hbm} "
                  f"| {peak / hbm:.0%} |", flush=True)  # fmt: skip
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rows, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/sd_state_size.json")
    parser.add_argument("--memory", action="store_true", help="compile the SD1.5 step instead")
    parser.add_argument("--devices", default="8", help="simulated CPU devices (--memory)")
    parser.add_argument("--variant", default="", help="sd15 config variant (--memory)")
    parser.add_argument("--memory_out", default="benchmarks/results/sd15_step_memory.json")
    parser.add_argument("--presets", action="store_true", help="--memory of every preset")
    parser.add_argument("--models", default="sd15,sdxl", help="configs of --presets")
    parser.add_argument("--machines", default=",".join(sd_common.HBM_GIB), help="of --presets")
    parser.add_argument("--lora", type=int, default=0, help="--presets of a LoRA student, rank")
    parser.add_argument("--presets_out", default="")
    parser.add_argument("--lora_ranks", default="4,16,64", help="LoRA factor counts at these ranks")
    args = parser.parse_args()
    if args.memory and args.presets:
        default = "sd_preset_memory_lora.json" if args.lora else "sd_preset_memory.json"
        out = Path(args.presets_out or f"benchmarks/results/{default}")
        presets(args.models.split(","), out, args.machines.split(","), args.lora)
        return
    if args.memory:
        memory(args.variant, Path(args.memory_out))
        return
    ranks = [int(r) for r in args.lora_ranks.split(",")]
    rows = {}
    lora_cols = "".join(f" LoRA r{r} |" for r in ranks)
    print("| config | UNet | text encoder(s) | VAE | trained state | frozen models | total "
          f"| per device, fsdp=8 |{lora_cols}")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(ranks))
    for name, module in {**CONFIGS, "shapes": shapes_imagine_flash}.items():
        config = module.get_config()
        n = parameter_counts(config)
        n.update(lora_counts(config, ranks))
        trained = 16 * n["unet"] / 1e9
        frozen = 4 * (n["unet"] + n["text"] + n["autoencoder"]) / 1e9
        rows[name] = {**n, "trained_gb": trained, "frozen_gb": frozen}
        factors = "".join(
            f" {n[f'lora_r{r}'] / 1e6:.2f} M ({100 * n[f'lora_r{r}'] / n['unet']:.1f} %) |"
            for r in ranks
        )
        print(
            f"| {name} | {n['unet'] / 1e6:.1f} M | {n['text'] / 1e6:.1f} M | "
            f"{n['autoencoder'] / 1e6:.1f} M | {trained:.1f} GB | {frozen:.1f} GB | "
            f"{trained + frozen:.1f} GB | {(trained + frozen) / 8:.1f} GB |{factors}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
