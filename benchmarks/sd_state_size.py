"""Parameter counts of the configs/sd models and the training state they imply (no weights needed).

  python -m benchmarks.sd_state_size [--out benchmarks/results/sd_state_size.json]

Counts come from abstract initialisation (`jax.eval_shape`) of the configs' model dicts. Bytes:
the trained student UNet keeps float32 parameters, two Adam moments and an EMA copy (16 B/param);
the frozen teacher UNet, text encoder(s) and VAE are held as loaded (float32, 4 B/param). The
per-device column divides everything by 8 (fsdp=8: state and frozen models fully sharded).
Activations and the discriminator heads come on top. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

from configs.sd import sd15_imagine_flash, sd21_imagine_flash, sdxl_imagine_flash
from flash_jax.models import autoencoder, text, unet

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/sd_state_size.json")
    args = parser.parse_args()
    rows = {}
    print("| config | UNet | text encoder(s) | VAE | trained state | frozen models | total "
          "| per device, fsdp=8 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, module in CONFIGS.items():
        n = parameter_counts(module.get_config())
        trained = 16 * n["unet"] / 1e9
        frozen = 4 * (n["unet"] + n["text"] + n["autoencoder"]) / 1e9
        rows[name] = {**n, "trained_gb": trained, "frozen_gb": frozen}
        print(
            f"| {name} | {n['unet'] / 1e6:.1f} M | {n['text'] / 1e6:.1f} M | "
            f"{n['autoencoder'] / 1e6:.1f} M | {trained:.1f} GB | {frozen:.1f} GB | "
            f"{trained + frozen:.1f} GB | {(trained + frozen) / 8:.1f} GB |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
