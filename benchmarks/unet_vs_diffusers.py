"""Forward-pass speed: flash-jax UNet (jitted) vs diffusers UNet2DConditionModel (PyTorch).

Both run the same random weights (imported with `flash_jax.weights.unet_from_diffusers`; the
outputs are checked to agree) in float32. JAX runs on its default backend, once per attention
implementation in `--attention`; PyTorch on the CPU with one thread per core. Every program is
called once per round in turn, in --repeats blocks of --iters rounds; `time_vs_diffusers` is the
ratio of medians per block (median, range, values). Prints a table and writes JSON.

  python benchmarks/unet_vs_diffusers.py --channels 128,256,256 --size 32 --batch 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common
from flash_jax import weights
from flash_jax.models import unet


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--channels", default="128,256,256", help="block_out_channels, comma-separated")
    p.add_argument("--layers-per-block", type=int, default=2)
    p.add_argument("--heads", type=int, default=8, help="attention heads per block")
    p.add_argument("--cross-dim", type=int, default=256, help="cross_attention_dim")
    p.add_argument("--seq-len", type=int, default=77, help="text tokens")
    p.add_argument("--linear-projection", action="store_true", help="SD2/SDXL-style projections")
    p.add_argument("--size", type=int, default=32, help="latent side")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=10, help="interleaved rounds per repeat")
    p.add_argument("--repeats", type=int, default=3, help="blocks the ratio is measured in")
    p.add_argument(
        "--attention",
        default="default,per_head",
        help="flash-jax attention implementations to time, comma-separated (UNetConfig."
        'attention_implementation; "default": jax.nn.dot_product_attention\'s choice)',
    )
    p.add_argument("--out", default="benchmarks/results/unet_vs_diffusers.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    channels = tuple(int(c) for c in args.channels.split(","))
    n = len(channels)
    config_dict = dict(
        sample_size=args.size,
        block_out_channels=channels,
        layers_per_block=args.layers_per_block,
        cross_attention_dim=args.cross_dim,
        attention_head_dim=args.heads,
        use_linear_projection=args.linear_projection,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
    )
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    torch_model = UNet2DConditionModel(**config_dict).eval()
    n_params = sum(p.numel() for p in torch_model.parameters())
    base_config = unet.UNetConfig.from_diffusers(dict(torch_model.config))
    state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    params = jax.device_put(weights.unet_from_diffusers(state_dict, base_config))

    rs = np.random.RandomState(0)
    x = rs.randn(args.batch, 4, args.size, args.size).astype(np.float32)
    t = rs.randint(0, 1000, size=args.batch)
    ctx = rs.randn(args.batch, args.seq_len, args.cross_dim).astype(np.float32)

    tx = [torch.from_numpy(a) for a in (x, t, ctx)]
    with torch.no_grad():
        ref = torch_model(*tx).sample.numpy()

    def torch_call() -> None:
        with torch.no_grad():
            torch_model(*tx)

    jx = [jax.device_put(a) for a in (x.transpose(0, 2, 3, 1), t, ctx)]
    calls = {"diffusers": torch_call}
    timed = {}
    for name in args.attention.split(","):
        impl = None if name == "default" else name
        config = dataclasses.replace(base_config, attention_implementation=impl)
        apply = jax.jit(unet.UNet(config).apply)
        t0 = time.perf_counter()
        out = jax.block_until_ready(apply({"params": params}, *jx))
        compile_s = time.perf_counter() - t0
        calls[name] = lambda apply=apply: apply({"params": params}, *jx)
        rel_err = float(
            np.linalg.norm(np.asarray(out).transpose(0, 3, 1, 2) - ref) / np.linalg.norm(ref)
        )
        timed[name] = dict(compile_s=compile_s, output_rel_l2=rel_err)
    for _ in range(args.warmup):
        for call in calls.values():
            jax.block_until_ready(call())
    # Interleaved rounds (torch and every JAX program in turn), in blocks: the ratio per block.
    blocks = common.interleaved_repeats(calls, iters=args.iters, repeats=args.repeats)
    times = common.merged(blocks)
    torch_ms = times.pop("diffusers")
    torch_med = statistics.median(torch_ms)
    for name, ms in times.items():
        timed[name] |= dict(
            ms=ms,
            median_ms=statistics.median(ms),
            speedup_vs_torch=torch_med / statistics.median(ms),
            time_vs_diffusers=common.ratio_spread(blocks, [name], ["diffusers"]),
        )
    result = dict(
        benchmark="unet_vs_diffusers",
        config=config_dict,
        params_millions=n_params / 1e6,
        batch=args.batch,
        latent_size=args.size,
        seq_len=args.seq_len,
        dtype="float32",
        jax_backend=jax.default_backend(),
        jax_devices=[str(d) for d in jax.devices()],
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        iters=args.iters,
        repeats=args.repeats,
        versions=dict(
            jax=jax.__version__, torch=torch.__version__, python=platform.python_version()
        ),
        torch_ms=torch_ms,
        torch_median_ms=torch_med,
        jax=timed,
    )
    print(
        f"UNet {channels}, {n_params / 1e6:.1f} M params, batch {args.batch}, "
        f"{args.size}x{args.size} latents, {args.seq_len} tokens, float32, "
        f"median of {args.repeats} x {args.iters} interleaved rounds"
    )
    header = f"{'implementation':<40}{'ms / forward':>14}{'min':>10}{'time vs diffusers':>26}"
    print(header + f"{'rel L2 vs diffusers':>21}{'compile s':>11}")
    for name, r in timed.items():
        s = r["time_vs_diffusers"]
        spread = f"{s['median']:.2f}× ({s['min']:.2f}-{s['max']:.2f})"
        print(
            f"{'flash-jax, attention ' + name:<40}{r['median_ms']:>14.1f}{min(r['ms']):>10.1f}"
            f"{spread:>26}{r['output_rel_l2']:>21.1e}{r['compile_s']:>11.1f}"
        )
    print(f"{'diffusers (torch cpu)':<40}{torch_med:>14.1f}{min(torch_ms):>10.1f}{1.0:>18.2f}×")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")
    return result


if __name__ == "__main__":
    main()
