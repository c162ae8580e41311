"""Real-SD support of t2i.T2I against diffusers' own pipelines, on tiny random-weight
SD1.5-, SD2.1- and SDXL-shaped folders written here: loading from a diffusers folder (and its
errors), the CLIP BPE tokenizer(s), prompt / pooled / empty-prompt conditioning and the UNet call
(SDXL's size micro-conditioning included)."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from flash_jax import t2i, weights
from tests import tiny_sd

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPTS = ["a red cat on the mat", "photo of a blue dog"]


def t2i_config(dicts, folder, **options):
    model = {k: dict(v) for k, v in dicts.items()}
    model |= dict(pretrained=str(folder), **options)
    return ml_collections.ConfigDict(
        dict(
            model=model,
            schedule=dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        )
    )


def reference_tokenizer(folder):
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (folder / "merges.txt").read_text().splitlines()[1:]]
    pad = json.loads((folder / "special_tokens_map.json").read_text())["pad_token"]
    # Positional vocab/merges: transformers 5 ignores vocab_file=/merges_file= (ENV.md).
    tok = transformers.CLIPTokenizer(vocab, merges, pad_token=pad)
    tok.model_max_length = tiny_sd.LENGTH
    return tok


@pytest.fixture(scope="module", params=["sd15", "sd21", "sdxl"])
def case(request, tmp_path_factory):
    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    dicts = tiny_sd.write_pipeline(folder, kind)
    options = {"force_zeros_for_empty_prompt": True} if kind == "sdxl" else {}
    model = t2i.T2I.from_config(t2i_config(dicts, folder, **options))
    params = model.load_pretrained(("unet", "text", "vae"))

    load = lambda cls, sub: cls.from_pretrained(folder / sub)  # noqa: E731
    parts = dict(
        vae=load(diffusers.AutoencoderKL, "vae"),
        text_encoder=load(transformers.CLIPTextModel, "text_encoder"),
        tokenizer=reference_tokenizer(folder / "tokenizer"),
        unet=load(diffusers.UNet2DConditionModel, "unet"),
        scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False),
    )
    if kind == "sdxl":
        parts |= dict(
            text_encoder_2=load(transformers.CLIPTextModelWithProjection, "text_encoder_2"),
            tokenizer_2=reference_tokenizer(folder / "tokenizer_2"),
            force_zeros_for_empty_prompt=True,
        )
        reference = diffusers.StableDiffusionXLPipeline(**parts)
    else:
        parts |= dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        reference = diffusers.StableDiffusionPipeline(**parts)
    return kind, folder, dicts, model, params, reference


def test_tokenizer_ids(case):
    kind, _, _, model, _, _ = case
    vocab, _ = tiny_sd.bpe()
    ids = model.tokenizer()(PROMPTS)
    rows = ids[:, 0] if kind == "sdxl" else ids
    assert ids.shape == ((2, 2, tiny_sd.LENGTH) if kind == "sdxl" else (2, tiny_sd.LENGTH))
    words = [vocab[w + "</w>"] for w in PROMPTS[0].split()]
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    np.testing.assert_array_equal(rows[0, : len(words) + 2], [bos, *words, eos])
    pad = vocab["!"] if kind == "sd21" else eos
    np.testing.assert_array_equal(rows[0, len(words) + 2 :], pad)
    if kind == "sdxl":  # tokenizer_2 pads with "!"
        np.testing.assert_array_equal(ids[0, 1, : len(words) + 2], [bos, *words, eos])
        np.testing.assert_array_equal(ids[0, 1, len(words) + 2 :], vocab["!"])


def test_conditioning_matches_diffusers_encode_prompt(case):
    kind, _, _, model, params, reference = case
    tokens = model.tokenizer()(PROMPTS)
    empty = model.tokenizer()([""])[0]
    embeds, pooled = jax.jit(model.embed_prompts)(params["text"], tokens)
    (uncond_context, uncond_pooled) = model.uncond_conditioning(params["text"], empty, 2)
    with torch.no_grad():
        if kind == "sdxl":
            ref, ref_neg, ref_pooled, ref_neg_pooled = reference.encode_prompt(
                PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
            )
            np.testing.assert_allclose(pooled, ref_pooled.numpy(), atol=1e-5)
            np.testing.assert_array_equal(uncond_pooled, ref_neg_pooled.numpy())  # zeros
            uncond = uncond_context["hidden_states"]
        else:
            ref, ref_neg = reference.encode_prompt(
                PROMPTS, "cpu", 1, True, negative_prompt=["", ""]
            )
            uncond = uncond_context
    np.testing.assert_allclose(embeds, ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(uncond, ref_neg.numpy(), atol=1e-5)


def test_unet_call_matches_diffusers(case):
    kind, _, _, model, params, reference = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([10.0, 700.0], np.float32)
    tokens = model.tokenizer()(PROMPTS)
    context, pooled = model.encode_text_pooled(params["text"], tokens)
    out = jax.jit(model.apply_unet)(params["unet"], x, t, context)
    embeds = context["hidden_states"] if kind == "sdxl" else context
    kw = {}
    if kind == "sdxl":
        size = (8 * model.autoencoder.downsample_factor,) * 2
        time_ids = reference._get_add_time_ids(
            size, (0, 0), size, torch.float32, text_encoder_projection_dim=24
        ).repeat(2, 1)
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.tensor(np.asarray(pooled)),
            "time_ids": time_ids,
        }
    with torch.no_grad():
        ref = reference.unet(
            torch.tensor(x).permute(0, 3, 1, 2),
            torch.tensor(t),
            torch.tensor(np.asarray(embeds)),
            **kw,
        ).sample
    np.testing.assert_allclose(out, ref.permute(0, 2, 3, 1).numpy(), atol=2e-4)


def test_latent_moments_match_diffusers_vae(case):
    _, _, _, model, params, reference = case
    images = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    mean, std = jax.jit(model.latent_moments)(params["vae"], images)
    x = torch.tensor(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    with torch.no_grad():
        dist = reference.vae.encode(x).latent_dist
    scale = reference.vae.config.scaling_factor
    np.testing.assert_allclose(mean, (dist.mean * scale).permute(0, 2, 3, 1).numpy(), atol=1e-5)
    np.testing.assert_allclose(std, (dist.std * scale).permute(0, 2, 3, 1).numpy(), rtol=1e-4)


def test_folder_must_match_the_config(tmp_path):
    dicts = tiny_sd.write_pipeline(tmp_path, "sd15")
    other = {k: dict(v) for k, v in dicts.items()}
    other["unet"]["layers_per_block"] = 2
    model = t2i.T2I.from_config(t2i_config(other, tmp_path))
    with pytest.raises(ValueError, match=r"unet/config.json differs[\s\S]*layers_per_block"):
        model.load_pretrained(("unet",))
    with pytest.raises(ValueError, match=r"config\.model\.pretrained is empty"):
        t2i.T2I.from_config(t2i_config(dicts, "")).load_pretrained(("vae",))
    with pytest.raises(ValueError, match="cross_attention_dim"):
        bad = {k: dict(v) for k, v in dicts.items()}
        bad["text"]["hidden_size"] = 16
        t2i.T2I.from_config(t2i_config(bad, tmp_path))
    with pytest.raises(ValueError, match="unknown keys"):
        t2i.T2I.from_config(t2i_config(dicts, tmp_path, colour="red"))


def test_weight_variants_are_read_separately(tmp_path):
    """Hub snapshots keep `diffusion_pytorch_model.safetensors` and `.fp16.safetensors` side by
    side: the plain load must ignore the fp16 file, `variant="fp16"` must read only it."""
    dicts = tiny_sd.write_pipeline(tmp_path, "sd15")
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    unet.half().save_pretrained(tmp_path / "unet", variant="fp16")
    plain = t2i.T2I.from_config(t2i_config(dicts, tmp_path)).load_pretrained(("unet",))
    half = t2i.T2I.from_config(t2i_config(dicts, tmp_path, variant="fp16"))
    half = half.load_pretrained(("unet",))
    w, w16 = (p["unet"]["conv_in"]["kernel"] for p in (plain, half))
    assert not np.array_equal(w, w16)  # fp16 rounding: a different file was read
    np.testing.assert_allclose(w, w16, atol=1e-3)
    with pytest.raises(weights.WeightsError, match=r"variant 'bf16'.*\['', 'fp16'\]"):
        weights.load_safetensors_dir(tmp_path / "unet", "bf16")
