"""How much of the image survives at t = T? The low-frequency signal-to-noise ratio of the terminal
timestep, on the testbed's latents and on Stable Diffusion's latent shape.

  python -m benchmarks.terminal_leak                          # the testbed rows + SD1.5's bound
  python -m benchmarks.terminal_leak --sd-cache /data/coco_sd15_cache   # + SD1.5 measured

Training noises a clean latent x0 (h, w, c) to x_T = α_T·x0 + σ_T·ε at t = T − 1 (the first step
of a trailing sampler). The per-channel spatial mean of ε has variance 1/(h·w), so the image's own
channel means m = mean_hw(x0) reach x_T with

  SNR_low = α_T² · Var_images(m) · h·w / σ_T²           (averaged over channels)

against the per-pixel SNR = α_T² · Var(x0) / σ_T². "bound" is SNR_low at Var(m) = 1, a property
of the schedule and the latent shape only. SD's 64x64 latents keep a much larger share of the
mean image than the testbed's 8x8 ones: the leak backward distillation exists to remove. The last
column is the terminal ᾱ_T a schedule would need for the row's latents to leak as much as SD1.5's
(against SD1.5's measured SNR_low with --sd-cache, else bound against bound). Writes terminal_leak.json ($OUT if set, else
benchmarks/results/).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

from benchmarks import common
from configs.sd import common as sd_common
from flash_jax import config as flash_config
from flash_jax import diffusion
from flash_jax.data import cache_reader
from flash_jax.eval import judge
from flash_jax.frozen import load_autoencoder
from flash_jax.t2i import T2I

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "shapes"
TESTBED = {  # row -> (config, shipped autoencoder)
    "testbed 8x8 (f4)": ("configs/shapes/teacher.py", ASSETS / "autoencoder.msgpack"),
    "testbed 16x16 (f2)": ("configs/shapes/teacher.py:f2", ASSETS / "autoencoder_f2.msgpack"),
}


def leak(latents: np.ndarray, alpha_bar_T: float) -> dict[str, float]:
    """SNR_low, its unit-variance bound and the per-pixel SNR of latents `(N, h, w, c)` at ᾱ_T."""
    _, h, w, _ = latents.shape
    means = latents.mean(axis=(1, 2))  # (N, c)
    odds = alpha_bar_T / (1.0 - alpha_bar_T)
    return {
        "latent_shape": list(latents.shape[1:]),
        "alpha_bar_T": alpha_bar_T,
        "var_channel_mean": float(means.var(axis=0).mean()),
        "snr_low": float(odds * means.var(axis=0).mean() * h * w),
        "snr_low_bound": float(odds * h * w),
        "snr_pixel": float(odds * latents.var(axis=0).mean()),
        "n": int(latents.shape[0]),
    }


def alpha_bar_to_match(snr_low: float, var_channel_mean: float, hw: int) -> float:
    """The ᾱ_T at which latents with `var_channel_mean` over `hw` positions reach `snr_low`."""
    odds = snr_low / (var_channel_mean * hw)
    return odds / (1.0 + odds)


def testbed_latents(spec: str, autoencoder: Path, n: int, seed: int) -> tuple[np.ndarray, float]:
    """Posterior means `(n, h, w, c)` of `n` Shapes train images, and the config's ᾱ_T."""
    config = flash_config.load_config_file(spec)
    flash_config.set_dotted(config, "autoencoder_workdir", str(autoencoder))
    model = T2I.from_config(config)
    vae = load_autoencoder(config, model)
    images, _ = judge.real_examples("train", n, seed, config.data.image_size)
    moments = jax.jit(model.latent_moments)
    means = [np.asarray(moments(vae, images[i : i + 100])[0]) for i in range(0, n, 100)]
    return np.concatenate(means), float(model.schedule.alphas_cumprod[-1])


def cache_latents(data_dir: str, n: int) -> np.ndarray:
    """The first `n` stored posterior means of a latent cache's train split `(n, h, w, c)`."""
    ds = cache_reader.make_cache_dataset(
        data_dir,
        "train",
        min(n, 64),
        0,
        cache_reader.stored_image_size(data_dir),
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
        shard_index=0,
        shard_count=1,
    )
    batches, total = [], 0
    for batch in ds:
        batches.append(np.asarray(batch["latent_mean"], np.float32))
        total += len(batches[-1])
        if total >= n:
            break
    return np.concatenate(batches)[:n]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sd-cache", default="", help="an SD1.5 latent cache (flash_jax.data.cache)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    sd_alpha_bar_T = float(
        diffusion.make_schedule(**sd_common.schedule().to_dict()).alphas_cumprod[-1]
    )
    rows = {}
    for name, (spec, autoencoder) in TESTBED.items():
        rows[name] = leak(*testbed_latents(spec, autoencoder, args.num_images, args.seed))
    h, w, c = 64, 64, 4  # SD1.5 at 512 px
    if args.sd_cache:
        rows["SD1.5 64x64 (measured)"] = leak(
            cache_latents(args.sd_cache, args.num_images), sd_alpha_bar_T
        )
    odds = sd_alpha_bar_T / (1.0 - sd_alpha_bar_T)
    rows["SD1.5 64x64 (bound)"] = {
        "latent_shape": [h, w, c],
        "alpha_bar_T": sd_alpha_bar_T,
        "snr_low_bound": odds * h * w,
    }
    measured = rows.get("SD1.5 64x64 (measured)")
    for name in TESTBED:
        row = rows[name]
        hw = row["latent_shape"][0] * row["latent_shape"][1]
        row["alpha_bar_T_to_match_sd"] = (  # bound against bound when SD's Var(m) is not measured
            alpha_bar_to_match(measured["snr_low"], row["var_channel_mean"], hw)
            if measured
            else alpha_bar_to_match(rows["SD1.5 64x64 (bound)"]["snr_low_bound"], 1.0, hw)
        )

    def fmt(row: dict, key: str) -> str:
        return f"{row[key]:.3g}" if key in row else "-"

    header = ["latents", "ᾱ_T", "Var(m)", "SNR_low", "bound", "SNR_pixel", "ᾱ_T to match SD"]
    keys = ["alpha_bar_T", "var_channel_mean", "snr_low", "snr_low_bound", "snr_pixel"]
    keys.append("alpha_bar_T_to_match_sd")
    table = [[name, *(fmt(row, k) for k in keys)] for name, row in rows.items()]
    print(common.table(table, header))
    result = {"rows": rows, "args": vars(args), "platform": common.platform_info()}
    print("wrote", common.write_json(result, "terminal_leak.json", args.out))


if __name__ == "__main__":
    main()
