"""configs/sd: each config parses and validates, its model dicts carry the published diffusers /
transformers config.json values, and the models they describe have the published parameter
counts — counted on our flax modules (abstractly) and on diffusers/transformers built from the same
dicts (on the meta device: no memory, no weights)."""

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from configs.sd import common, sd15_imagine_flash, sd21_imagine_flash, sdxl_imagine_flash
from flash_jax import frozen, t2i
from flash_jax.data import cache
from flash_jax.methods.imagine_flash import ImagineFlashConfig
from flash_jax.models import autoencoder, text, unet

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"sd15": sd15_imagine_flash, "sd21": sd21_imagine_flash, "sdxl": sdxl_imagine_flash}

# Published values (the models' config.json files) that define each architecture.
PUBLISHED = {
    "sd15": {
        "unet": dict(
            block_out_channels=[320, 640, 1280, 1280],
            cross_attention_dim=768,
            attention_head_dim=8,
            layers_per_block=2,
            use_linear_projection=False,
            sample_size=64,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        ),
        "text": dict(hidden_size=768, num_hidden_layers=12, hidden_act="quick_gelu"),
        "autoencoder": dict(block_out_channels=[128, 256, 512, 512], scaling_factor=0.18215),
        "prediction_type": "epsilon",
        "image_size": 512,
    },
    "sd21": {
        "unet": dict(
            block_out_channels=[320, 640, 1280, 1280],
            cross_attention_dim=1024,
            attention_head_dim=[5, 10, 20, 20],
            use_linear_projection=True,
            upcast_attention=True,
            sample_size=96,
        ),
        "text": dict(hidden_size=1024, num_hidden_layers=23, hidden_act="gelu", projection_dim=512),
        "autoencoder": dict(block_out_channels=[128, 256, 512, 512], sample_size=768),
        "prediction_type": "v_prediction",
        "image_size": 768,
    },
    "sdxl": {
        "unet": dict(
            block_out_channels=[320, 640, 1280],
            cross_attention_dim=2048,
            attention_head_dim=[5, 10, 20],
            transformer_layers_per_block=[1, 2, 10],
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            use_linear_projection=True,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            sample_size=128,
        ),
        "text": dict(hidden_size=768, num_hidden_layers=12, hidden_act="quick_gelu"),
        "text_2": dict(
            hidden_size=1280, num_hidden_layers=32, projection_dim=1280, hidden_act="gelu"
        ),
        "autoencoder": dict(scaling_factor=0.13025, sample_size=1024),
        "prediction_type": "epsilon",
        "image_size": 1024,
    },
}

# Parameter counts of the released checkpoints.
PUBLISHED_PARAMS = {
    "sd15": {"unet": 859_520_964, "text": 123_060_480, "autoencoder": 83_653_863},
    "sd21": {"unet": 865_910_724, "text": 340_387_840, "autoencoder": 83_653_863},
    "sdxl": {
        "unet": 2_567_463_684,
        "text": 123_060_480,
        "text_2": 694_659_840,
        "autoencoder": 83_653_863,
    },
}


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", CONFIGS)
def test_model_dicts_carry_the_published_values(name):
    config = CONFIGS[name].get_config()
    expected = PUBLISHED[name]
    for part in ("unet", "text", "text_2", "autoencoder"):
        for key, value in expected.get(part, {}).items():
            assert config.model[part][key] == value, (name, part, key)
    assert ("text_2" in config.model) == (name == "sdxl")
    assert config.schedule.prediction_type == expected["prediction_type"]
    assert config.data.image_size == 0  # the cache's; the cache job's: the native size
    assert cache.native_image_size(t2i.T2I.from_config(config)) == expected["image_size"]
    assert config.model.force_zeros_for_empty_prompt == (name == "sdxl")


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("variant", ["", *common.HBM_GIB, "all", "1"])
def test_configs_parse_and_validate(name, variant):
    config = CONFIGS[name].get_config(variant)
    model = t2i.T2I.from_config(config)  # cross-attention width, SDXL text_time sizes
    assert model.unet.dtype == np.dtype("bfloat16") and model.unet.remat
    size = cache.native_image_size(model)
    assert model.latent_shape(1, size)[1] == config.model.unet.sample_size
    ImagineFlashConfig(**config.imagine_flash.to_dict())
    assert config.data.source == "cache" and config.data.data_dir == ""
    assert config.model.pretrained == ""  # the one path users must give
    assert set(config.mesh) == {"data", "fsdp", "tensor"}
    if variant in common.HBM_GIB:  # 8 chips, the batch split over data x fsdp
        assert math.prod(config.mesh.values()) == 8 and config.mesh.data == 1
        assert config.batch_size % (config.mesh.data * config.mesh.fsdp) == 0
        assert config.frozen_dtype == "bfloat16"
    else:
        assert config.mesh.data == -1 and config.batch_size == 64
    with pytest.raises(ValueError, match=r"model\.pretrained.*teacher_workdir"):
        frozen.load_teacher(config, model)


def test_attention_implementation_reaches_the_unet_and_is_checked():
    config = sd15_imagine_flash.get_config("")
    assert t2i.T2I.from_config(config).unet.attention_implementation is None  # "": JAX's
    config.model.attention_implementation = "per_head"
    assert t2i.T2I.from_config(config).unet.attention_implementation == "per_head"
    config.model.attention_implementation = "flash"
    with pytest.raises(ValueError, match=r"attention_implementation='flash'"):
        t2i.T2I.from_config(config)


def test_unknown_variant_is_an_error():
    with pytest.raises(
        ValueError, match=r"sd15_imagine_flash\.py: unknown variant\(s\) \['v100'\]"
    ):
        sd15_imagine_flash.get_config("v100")
    with pytest.raises(ValueError, match="pick one machine preset"):
        sd15_imagine_flash.get_config("tpu_v4_8,gpu_8xh100")


def _flax_counts(config) -> dict[str, int]:
    key = jax.random.key(0)
    u = unet.UNetConfig.from_diffusers(config.model.unet.to_dict())
    out = {"unet": count(jax.eval_shape(lambda: unet.init_params(u, key, sample_size=8)))}
    for part in ("text", "text_2"):
        if part in config.model:
            t = text.CLIPTextConfig.from_transformers(config.model[part].to_dict())
            init = lambda t=t, p=part: text.init_params(t, key, with_projection=p == "text_2")  # noqa: E731
            out[part] = count(jax.eval_shape(init))
    a = autoencoder.AutoencoderConfig.from_diffusers(config.model.autoencoder.to_dict())
    out["autoencoder"] = count(jax.eval_shape(lambda: autoencoder.init_params(a, key)))
    return out


def _torch_counts(config) -> dict[str, int]:
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    out = {}
    with torch.device("meta"):
        out["unet"] = n(diffusers.UNet2DConditionModel(**config.model.unet.to_dict()))
        for part, cls in (
            ("text", transformers.CLIPTextModel),
            ("text_2", transformers.CLIPTextModelWithProjection),
        ):
            if part in config.model:
                d = {k: v for k, v in config.model[part].to_dict().items() if k != "model_type"}
                out[part] = n(cls(transformers.CLIPTextConfig(**d)))
        out["autoencoder"] = n(diffusers.AutoencoderKL(**config.model.autoencoder.to_dict()))
    return out


@pytest.mark.slow  # traces three full-size UNets abstractly (~20 s here)
@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_counts_match_diffusers_and_the_releases(name):
    config = CONFIGS[name].get_config()
    ours = _flax_counts(config)
    assert ours == _torch_counts(config)
    assert ours == PUBLISHED_PARAMS[name]


def test_folder_variant_takes_the_architecture_from_the_folder(tmp_path):
    pytest.importorskip("diffusers")
    from tests import tiny_sd

    dicts = tiny_sd.write_pipeline(tmp_path, "sdxl")
    config = sdxl_imagine_flash.get_config(f"1,folder={tmp_path}")
    assert config.model.pretrained == str(tmp_path)
    for part, d in json.loads(json.dumps(dicts)).items():
        assert {k: config.model[part][k] for k in d} == d, part
    model = t2i.T2I.from_config(config)
    assert set(model.load_pretrained(("unet", "text"))) == {"unet", "text"}
    pinned = sdxl_imagine_flash.get_config("1")  # the default: the published architecture
    pinned.model.pretrained = str(tmp_path)
    with pytest.raises(ValueError, match=r"unet/config.json differs from config.model"):
        t2i.T2I.from_config(pinned).load_pretrained(("unet",))
    (tmp_path / "text_encoder_2" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"text_encoder_2/config\.json: no such file"):
        sdxl_imagine_flash.get_config(f"folder={tmp_path}")


PRESET_MEMORY = json.loads((ROOT / "benchmarks/results/sd_preset_memory.json").read_text())


@pytest.mark.parametrize("key", sorted(PRESET_MEMORY))
def test_measured_presets_are_as_configured_and_fit(key):
    """A row of benchmarks/results/sd_preset_memory.json (docs/scaling.md's table) was compiled
    with the mesh, batch and dtypes its preset has now, and peaks under 90 % of the chip."""
    name, machine = key.split(":")
    row = PRESET_MEMORY[key]
    config = CONFIGS[name].get_config(machine)
    assert row["mesh"] == config.mesh.to_dict() and row["global_batch"] == config.batch_size
    assert row["frozen_dtype"] == config.frozen_dtype and row["remat"] == config.model.remat
    assert row["hbm_gib"] == common.HBM_GIB[machine]
    assert row["peak_gib"] == round(row["per_device_bytes"]["peak_estimate_bytes"] / 2**30, 2)
    assert row["peak_gib"] <= 0.9 * row["hbm_gib"]
