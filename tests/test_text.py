"""CLIP text encoder: parity with transformers 5 (PyTorch), weight import/export, tokenizer adapter."""

import functools
import gzip
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from flash_jax import weights
from flash_jax.models import text

TOL = 1e-4
VOCAB, LENGTH, BATCH = 100, 16, 3
# (hidden_act, with_projection, eos_token_id): every pair of the three binary choices occurs.
# eos 2 is transformers' legacy rule (pool at argmax(ids)); 50 pools at the first id 50, with
# larger ids present so the two rules pick different positions.
CASES = [
    ("quick_gelu", False, 2),
    ("quick_gelu", True, 50),
    ("gelu", False, 50),
    ("gelu", True, 2),
]


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def torch_config(act, eos):
    return transformers.CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=LENGTH,
        hidden_act=act,
        projection_dim=8,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=eos,
    )


def torch_model(tcfg, with_projection, seed):
    torch.manual_seed(seed)
    cls = (
        transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    )
    model = cls(tcfg).eval()
    with (
        torch.no_grad()
    ):  # O(1) random values everywhere (transformers' init leaves LN at 1, bias 0)
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.ndim == 2 and "embedding" not in name:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            else:
                p.copy_(0.5 * torch.randn_like(p))
    return model


def token_ids(eos, seed=0):
    """(BATCH, LENGTH): bos, random tokens, EOS, then padding (EOS, pad id 1, or none)."""
    rng = np.random.default_rng(seed)
    eos_token = VOCAB - 1 if eos == 2 else eos  # legacy: EOS must be the largest id
    ids = rng.integers(3, VOCAB - 1, size=(BATCH, LENGTH))
    ids[ids == eos_token] = 3
    ids[:, 0] = 0
    for row, (end, pad) in enumerate([(5, eos_token), (9, 1), (LENGTH - 1, None)]):
        ids[row, end] = eos_token
        if pad is not None:
            ids[row, end + 1 :] = pad
    return ids.astype(np.int32)


def torch_outputs(model, ids, mask=None):
    with torch.no_grad():
        out = model(
            torch.from_numpy(ids).long(),
            attention_mask=None if mask is None else torch.from_numpy(mask),
            output_hidden_states=True,
        )
    res = {
        "last_hidden_state": out.last_hidden_state.numpy(),
        "hidden_states": [h.numpy() for h in out.hidden_states],
    }
    if hasattr(out, "text_embeds"):
        res["text_embeds"] = out.text_embeds.numpy()
    else:
        res["pooler_output"] = out.pooler_output.numpy()
    return res


@functools.cache
def build(act, with_projection, eos):
    """Torch model, its outputs, imported params and a jitted flax apply for one case."""
    tcfg = torch_config(act, eos)
    model = torch_model(tcfg, with_projection, seed=len(act) + eos)
    config = text.CLIPTextConfig.from_transformers(tcfg.to_dict())
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    params = weights.clip_text_from_transformers(sd, config, with_projection)
    flax_model = text.CLIPTextModel(config, with_projection=with_projection)
    ids = token_ids(eos)
    return {
        "tcfg": tcfg,
        "torch": model,
        "config": config,
        "with_projection": with_projection,
        "state_dict": sd,
        "params": params,
        "apply": jax.jit(flax_model.apply),
        "ids": ids,
        "expected": torch_outputs(model, ids),
    }


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-proj{int(c[1])}-eos{c[2]}")
def case(request):
    return build(*request.param)


def test_parity_with_transformers(case):
    got = case["apply"]({"params": case["params"]}, jnp.asarray(case["ids"]))
    want = case["expected"]
    assert got["last_hidden_state"].shape == (BATCH, LENGTH, 32)
    assert rel_l2(got["last_hidden_state"], want["last_hidden_state"]) < TOL
    assert len(got["hidden_states"]) == len(want["hidden_states"]) == 3
    for g, w in zip(got["hidden_states"], want["hidden_states"], strict=True):
        assert rel_l2(g, w) < TOL
    if case["with_projection"]:
        assert got["text_embeds"].shape == (BATCH, 8)
        assert rel_l2(got["text_embeds"], want["text_embeds"]) < TOL
    else:
        assert "text_embeds" not in got
        assert rel_l2(got["pooler_output"], want["pooler_output"]) < TOL


def test_pooling_rule(case):
    """Pooling picks the EOS row of last_hidden_state by the config's rule (not just any row)."""
    got = case["apply"]({"params": case["params"]}, jnp.asarray(case["ids"]))
    eos = case["config"].eos_token_id
    ids = case["ids"]
    pos = ids.argmax(-1) if eos == 2 else (ids == eos).argmax(-1)
    np.testing.assert_array_equal(pos, [5, 9, LENGTH - 1])
    pooled = np.asarray(got["last_hidden_state"])[np.arange(BATCH), pos]
    np.testing.assert_allclose(got["pooler_output"], pooled)


def test_export_roundtrip(case):
    exported = weights.clip_text_to_transformers(case["params"], case["config"])
    fresh = torch_model(case["tcfg"], case["with_projection"], seed=1234)
    fresh.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in exported.items()}, strict=True
    )
    out = torch_outputs(fresh, case["ids"])
    for key, want in case["expected"].items():
        if key != "hidden_states":
            assert rel_l2(out[key], want) < 1e-6, key


def test_legacy_prefixed_names():
    """transformers 4 / Hub checkpoints prefix CLIPTextModel names with `text_model.`."""
    case = build(*CASES[0])
    sd = {f"text_model.{k}": v for k, v in case["state_dict"].items()}
    sd["text_model.embeddings.position_ids"] = np.arange(LENGTH)[None]
    params = weights.clip_text_from_transformers(sd, case["config"])
    jax.tree.map(np.testing.assert_array_equal, params, case["params"])
    exported = weights.clip_text_to_transformers(params, case["config"], legacy_names=True)
    assert set(exported) == set(sd) - {"text_model.embeddings.position_ids"}


def test_attention_mask_parity():
    tcfg = torch_config("quick_gelu", 50)
    model = torch_model(tcfg, False, seed=7)
    config = text.CLIPTextConfig.from_transformers(tcfg.to_dict())
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    params = weights.clip_text_from_transformers(sd, config)
    ids = token_ids(50)
    mask = np.ones_like(ids)
    mask[0, 6:] = 0
    mask[1, 10:] = 0
    want = torch_outputs(model, ids, mask)
    apply = jax.jit(text.CLIPTextModel(config).apply)
    got = apply({"params": params}, ids, jnp.asarray(mask))
    assert rel_l2(got["last_hidden_state"], want["last_hidden_state"]) < TOL
    assert rel_l2(got["pooler_output"], want["pooler_output"]) < TOL
    unmasked = apply({"params": params}, ids, jnp.ones_like(mask))
    assert rel_l2(got["last_hidden_state"], unmasked["last_hidden_state"]) > 1e-3


def test_weight_errors(case):
    sd, config, proj = case["state_dict"], case["config"], case["with_projection"]
    prefix = "text_model." if proj else ""
    name = f"{prefix}encoder.layers.1.mlp.fc1.weight"
    bad = {**sd, name: np.zeros((36, 32), np.float32)}
    with pytest.raises(weights.WeightsError, match=r"fc1\.weight.*\(36, 32\).*\(32, 37\)"):
        weights.clip_text_from_transformers(bad, config, proj)
    missing = {k: v for k, v in sd.items() if k != name}
    with pytest.raises(weights.WeightsError, match=r"missing .*fc1\.weight.*\(32, 37\)"):
        weights.clip_text_from_transformers(missing, config, proj)
    extra = {**sd, f"{prefix}encoder.layers.2.mlp.fc1.weight": np.zeros((37, 32), np.float32)}
    with pytest.raises(
        weights.WeightsError, match=r"unexpected .*layers\.2\.mlp\.fc1\.weight.*\(37, 32\)"
    ):
        weights.clip_text_from_transformers(extra, config, proj)
    with pytest.raises(weights.WeightsError, match="text_projection" if proj else "missing"):
        weights.clip_text_from_transformers(sd, config, not proj)
    other = text.CLIPTextConfig(**{**vars(config), "intermediate_size": 40})
    with pytest.raises(
        weights.WeightsError, match=r"fc1/kernel: params \(32, 37\) vs config \(32, 40\)"
    ):
        weights.clip_text_to_transformers(case["params"], other)


def test_from_pretrained_folder(tmp_path):
    from safetensors.numpy import save_file

    tcfg = torch_config("gelu", 2)
    model = torch_model(tcfg, True, seed=3)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(tcfg.to_dict()))
    config, params = weights.clip_text_from_pretrained(tmp_path, param_dtype=jnp.bfloat16)
    assert config.hidden_act == "gelu" and config.eos_token_id == 2
    assert params["text_projection"]["kernel"].shape == (32, 8)
    assert params["text_projection"]["kernel"].dtype == jnp.bfloat16


def _grad_loss(params, config, ids):
    out = text.CLIPTextModel(config).apply({"params": params}, ids)
    return jnp.sum(out["last_hidden_state"] ** 2) + jnp.sum(out["hidden_states"][-2])


def test_remat_and_init():
    case = build(*CASES[0])
    config = text.CLIPTextConfig(**{**vars(case["config"]), "remat": True})
    rand = jax.eval_shape(lambda: text.init_params(config, jax.random.key(0)))
    assert jax.tree.map(np.shape, rand) == jax.tree.map(np.shape, case["params"])

    # Tracing only (cheap): remat wraps each layer in a checkpoint (`remat2` / `checkpoint`) op.
    def n_remat(cfg):
        jaxpr = str(jax.make_jaxpr(_grad_loss, static_argnums=1)(rand, cfg, case["ids"]))
        return len(re.findall(r"= (?:remat\w*|checkpoint)\[", jaxpr))

    assert n_remat(config) == config.num_hidden_layers
    assert n_remat(case["config"]) == 0


@pytest.mark.slow
def test_remat_gradients():
    case = build(*CASES[0])
    config = text.CLIPTextConfig(**{**vars(case["config"]), "remat": True})
    grad = jax.jit(jax.grad(_grad_loss), static_argnums=1)
    g_remat = grad(case["params"], config, case["ids"])
    g_plain = grad(case["params"], case["config"], case["ids"])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_remat, g_plain
    )


def test_config_validation():
    base = torch_config("quick_gelu", 2).to_dict()
    assert text.CLIPTextConfig.from_transformers(base, remat=True).remat
    with pytest.raises(ValueError, match="'rope_theta'"):
        text.CLIPTextConfig.from_transformers({**base, "rope_theta": 1.0})
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        text.CLIPTextConfig.from_transformers({**base, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="'attention_dropout'"):
        text.CLIPTextConfig.from_transformers({**base, "attention_dropout": 0.1})
    with pytest.raises(ValueError, match="text_config"):
        text.CLIPTextConfig.from_transformers({"model_type": "clip", "text_config": base})
    with pytest.raises(ValueError, match="num_attention_heads"):
        text.CLIPTextConfig.from_transformers({**base, "num_attention_heads": 5})
    with pytest.raises(ValueError, match="override 'colour'"):
        text.CLIPTextConfig.from_transformers(base, colour=1)
    config = text.CLIPTextConfig.from_transformers(base)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        jax.eval_shape(
            text.CLIPTextModel(config).init,
            jax.random.key(0),
            jnp.zeros((1, LENGTH + 1), jnp.int32),
        )


# --------------------------------------------------------------------------------------------
# Tokenizer adapter, on a tiny BPE built here (no vocabulary files ship offline).

MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("r", "e"), ("re", "d</w>")]


@pytest.fixture(scope="module")
def bpe_gz(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2", *(" ".join(m) for m in MERGES)]) + "\n")
    return path


def test_tokenizer_adapter(bpe_gz, tmp_path):
    vocab, merges = text.clip_bpe_from_open_clip(bpe_gz)
    assert len(vocab) == 512 + len(MERGES) + 2 and merges == MERGES
    tok = text.CLIPTokenizerAdapter.from_vocab(vocab, merges)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    ids = tok(["A red  cat", "dog"])
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    first = [bos, vocab["a</w>"], vocab["red</w>"], vocab["cat</w>"], eos]
    np.testing.assert_array_equal(ids[0, :5], first)
    np.testing.assert_array_equal(ids[0, 5:], eos)  # SD1.x: pad with <|endoftext|>
    np.testing.assert_array_equal(ids[1, :3], [bos, vocab["dog</w>"], eos])
    long = tok("cat " * 100)
    assert long.shape == (1, 77) and long[0, 0] == bos and long[0, -1] == eos
    np.testing.assert_array_equal(long[0, 1:-1], vocab["cat</w>"])

    # A diffusers tokenizer/ folder with SD2's "!" pad token and a shorter max length.
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in MERGES) + "\n"
    )
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!"}}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    tok2 = text.CLIPTokenizerAdapter.from_folder(tmp_path)
    assert tok2.pad_token_id == vocab["!"] and tok2.eos_token_id == eos
    ids2 = tok2(["A red  cat", "dog"])
    assert ids2.shape == (2, 8)
    np.testing.assert_array_equal(ids2[0], [*first, vocab["!"], vocab["!"], vocab["!"]])
