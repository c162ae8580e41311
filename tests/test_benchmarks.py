"""The benchmarks' own pieces: the SD1.5 config copy, the in-memory frozen models, XLA analysis, and
the UNet-against-diffusers timing on a tiny UNet."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common, terminal_leak
from configs.sd import common as sd_common
from configs.sd import sd15_imagine_flash
from flash_jax.methods import imagine_flash as ifl
from flash_jax.models import autoencoder, text, unet
from flash_jax.t2i import T2I
from flash_jax.train import checkpoint, loop


def test_sd15_config_is_the_published_sd15():
    """benchmarks/common.py copies configs/sd/common.py's SD1.5 models as plain dicts (the GPU
    machines have no ml_collections); they must describe the same networks."""
    model = T2I.from_config(common.sd15_config(dtype="float32", param_dtype="float32"))
    knobs = dict(dtype=jnp.float32, param_dtype=jnp.float32, remat=True)
    want_unet = unet.UNetConfig.from_diffusers(sd_common.SD15_UNET, **knobs)
    got_unet = dataclasses.replace(model.unet, upcast_attention=want_unet.upcast_attention)
    assert got_unet == want_unet
    want_text = text.CLIPTextConfig.from_transformers(sd_common.CLIP_L_TEXT, remat=True)
    assert model.text == want_text
    want_vae = autoencoder.AutoencoderConfig.from_diffusers(sd_common.sd_vae(sample_size=512))
    assert model.autoencoder == want_vae
    assert model.max_length == 77


@pytest.mark.parametrize("field", ["optimizer", "disc_optimizer", "imagine_flash", "sample"])
def test_sd15_config_has_the_fields_of_configs_sd(field):
    """The copy has every field the SD1.5 config gives the method and the optimizers (a field
    added on main, e.g. optimizer.eps or sample, would otherwise break only the GPU run)."""
    got = common.sd15_config(tiny=True)[field]
    assert set(got) == set(sd15_imagine_flash.get_config()[field].to_dict())


def test_sd15_config_builds_the_method_and_its_optimizers():
    config = common.sd15_config(tiny=True)
    method = ifl.make(config)
    assert method.init_discriminator is not None and method.generate is not None
    loop.make_optimizer(config.optimizer)
    loop.make_optimizer(config.disc_optimizer)


def test_config_reads_like_a_config_dict():
    config = common.Config(a=1, nested={"b": [2, 3]})
    assert config.a == 1 and config.nested.b == [2, 3]
    assert config.nested.to_dict() == {"b": [2, 3]}
    with pytest.raises(AttributeError, match="no field 'missing'"):
        _ = config.missing


def test_frozen_in_memory_serves_only_its_paths_and_restores_the_loader():
    original = checkpoint.load_params
    tree = {"w": jnp.ones(2)}
    with common.frozen_in_memory({"memory://x": tree}):
        assert checkpoint.load_params("memory://x") is tree
        with pytest.raises(checkpoint.CheckpointError):
            checkpoint.load_params("/nonexistent/run")
    assert checkpoint.load_params is original


def test_scan_correction_recovers_the_unrolled_flop_count():
    """XLA counts a scan body once; adding (trips − 1) bodies gives the unrolled program's count."""

    def scanned(x):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ c), None), x, None, length=4)[0]

    def unrolled(x):
        for _ in range(4):
            x = jnp.tanh(x @ x)
        return x

    x = jnp.ones((32, 32))
    raw = common.flops_of(jax.jit(scanned).lower(x).compile())
    body = common.flops_of(jax.jit(lambda v: jnp.tanh(v @ v)).lower(x).compile())
    want = common.flops_of(jax.jit(unrolled).lower(x).compile())
    assert common.loops_counted_once()
    assert raw + 3 * body == pytest.approx(want, rel=0.01)


def test_interleaved_rounds_call_every_program_once_in_turn_and_stop_after_a_round():
    order = []
    calls = {name: (lambda name=name: order.append(name) or jnp.zeros(())) for name in "abc"}
    times = common.interleaved(calls, iters=3)
    assert order == list("abc") * 3
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert common.summary(times["a"])["iters"] == 3

    order.clear()
    stopped = common.interleaved(calls, iters=5, stop=lambda: True)
    assert order == list("abc") and all(len(t) == 1 for t in stopped.values())


def test_ratio_is_measured_per_block_with_median_and_range():
    blocks = [  # per block: a's median / (b + c)'s medians
        {"a": [10.0, 12.0, 11.0], "b": [4.0], "c": [6.0]},  # 11 / 10
        {"a": [9.0], "b": [5.0, 5.0], "c": [5.0]},  # 9 / 10
        {"a": [30.0], "b": [10.0], "c": [10.0]},  # 30 / 20
    ]
    spread = common.ratio_spread(blocks, ["a"], ["b", "c"])
    assert spread["values"] == pytest.approx([1.1, 0.9, 1.5])
    assert (spread["median"], spread["min"], spread["max"]) == pytest.approx((1.1, 0.9, 1.5))
    assert common.merged(blocks)["a"] == [10.0, 12.0, 11.0, 9.0, 30.0]

    order = []
    calls = {name: (lambda name=name: order.append(name) or jnp.zeros(())) for name in "ab"}
    repeated = common.interleaved_repeats(calls, iters=2, repeats=3)
    assert order == list("ab") * 6 and [len(b["a"]) for b in repeated] == [2, 2, 2]
    assert len(common.interleaved_repeats(calls, iters=2, repeats=3, stop=lambda: True)) == 1


def test_unet_vs_diffusers_times_every_attention_on_matching_outputs(tmp_path):
    pytest.importorskip("diffusers")
    from benchmarks import unet_vs_diffusers

    args = "--channels 32,64 --heads 2 --cross-dim 32 --seq-len 5 --size 8 --batch 1 --iters 1"
    args += " --repeats 2"
    result = unet_vs_diffusers.main([*args.split(), "--out", str(tmp_path / "r.json")])
    assert set(result["jax"]) == {"default", "per_head"} and len(result["torch_ms"]) == 2
    for timed in result["jax"].values():
        assert timed["output_rel_l2"] < 1e-5 and len(timed["ms"]) == 2
        spread = timed["time_vs_diffusers"]
        assert len(spread["values"]) == 2 and spread["min"] <= spread["median"] <= spread["max"]
    assert json.loads((tmp_path / "r.json").read_text())["jax"].keys() == result["jax"].keys()


def test_terminal_leak_matches_its_closed_form():
    """Latents whose channel means have variance v over h·w positions: SNR_low = odds·v·h·w; the
    ᾱ_T found to match a target SNR reproduces it."""
    rng = np.random.default_rng(0)
    v, n, h, w = 0.25, 20_000, 8, 8
    means = rng.normal(0.0, np.sqrt(v), (n, 1, 1, 4))
    latents = np.broadcast_to(means, (n, h, w, 4))  # pure channel means
    row = terminal_leak.leak(latents, alpha_bar_T=0.01)
    odds = 0.01 / 0.99
    assert row["snr_low_bound"] == pytest.approx(odds * h * w)
    assert row["snr_low"] == pytest.approx(odds * v * h * w, rel=0.03)
    assert row["snr_pixel"] == pytest.approx(odds * v, rel=0.03)
    target = 19.2
    ab = terminal_leak.alpha_bar_to_match(target, v, h * w)
    assert ab / (1 - ab) * v * h * w == pytest.approx(target)
