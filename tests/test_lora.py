"""LoRA students (flash_jax/lora.py): the factors, `config.lora`, every distillation as a LoRA
student of its frozen teacher (step 0 is the teacher, gradients reach only the factors, the
compiled step holds one copy of the base), and the peft layout diffusers loads."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.shapes import add as add_config
from configs.shapes import imagine_flash as if_config
from configs.shapes import lcm as lcm_config
from configs.shapes import step_distill as sd_config
from flash_jax import lora, weights
from flash_jax.config import ConfigError
from flash_jax.methods import add, imagine_flash, lcm, step_distill
from flash_jax.train.state import init_state
from flash_jax.train.step import make_train_step
from tests.test_baselines import make_batch, tiny_config

METHODS = {
    "imagine_flash": (imagine_flash, if_config, {"imagine_flash.adv_weight": 0.0}),
    "lcm": (lcm, lcm_config, {}),
    "add": (add, add_config, {"add.adv_weight": 0.0}),
    "step_distill": (step_distill, sd_config, {}),
}
LORA = {"lora.enabled": True, "lora.rank": 4, "lora.alpha": 8.0}


def leaves_with_paths(tree):
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def nbytes(tree) -> int:
    return sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------ config.lora


def lora_config(**values):
    config = if_config.get_config("tiny")
    with config.unlocked():
        config.lora.update(values)
    return config


@pytest.mark.parametrize(
    "values, message",
    [
        ({"rank": 8}, r"config.lora.rank=8 set but config.lora.enabled=False"),
        ({"targets": ("resnet",)}, r"config.lora.targets=\('resnet',\) set but"),
        ({"enabled": True, "rank": 0}, r"config.lora.rank=0 must be an integer >= 1"),
        ({"enabled": True, "alpha": -1.0}, r"config.lora.alpha=-1.0 must be a finite number > 0"),
        ({"enabled": True, "alpha": float("nan")}, r"config.lora.alpha=nan"),
        ({"enabled": True, "targets": ("attention", "mlp")}, r"\['mlp'\] unknown"),
        ({"enabled": True, "targets": ()}, r"config.lora.targets=\(\): need one or more"),
    ],
)
def test_bad_lora_config_names_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        lora.from_config(lora_config(**values))


def test_lora_config_values():
    assert lora.from_config(lora_config()) is None  # off by default
    got = lora.from_config(lora_config(enabled=True, rank=4, alpha=2.0, targets=("resnet",)))
    assert got == lora.LoRAConfig(rank=4, alpha=2.0, targets=("resnet",))
    assert got.scale == 0.5


# ------------------------------------------------------------------------------ pure functions


@pytest.fixture(scope="module")
def base():
    """A tiny SD-shaped UNet's params (random, so a merge shows in every tensor it touches)."""
    from flash_jax.models.unet import UNetConfig
    from tests import tiny_sd

    config = UNetConfig.from_diffusers(tiny_sd.model_dicts("sdxl")["unet"])
    abstract = weights.model_abstract("unet", config)
    shapes = jax.tree.leaves(abstract)
    keys = jax.random.split(jax.random.PRNGKey(0), len(shapes))
    leaves = [jax.random.normal(k, s.shape) for k, s in zip(keys, shapes, strict=True)]
    return jax.tree.unflatten(jax.tree.structure(abstract), leaves)


def test_targets_select_the_named_modules(base):
    config = lora.LoRAConfig(targets=("attention", "feed_forward", "resnet"))
    names = ["/".join(m) for m in lora.target_modules(base, config.targets)]
    block = "down_blocks_1/attentions_0/transformer_blocks_0"
    for m in ("attn1/to_q", "attn1/to_k", "attn1/to_v", "attn1/to_out_0", "attn2/to_k"):
        assert f"{block}/{m}" in names
    assert f"{block}/ff/net_0/proj" in names and f"{block}/ff/net_2" in names
    assert "mid_block/resnets_1/conv2" in names
    assert not [n for n in names if n.endswith(("proj_in", "conv_shortcut", "time_emb_proj"))]
    attention = lora.target_modules(base, ("attention",))
    blocks = {p.split("/attn")[0] for p in leaves_with_paths(base) if "/attn1/" in p}
    assert len(blocks) == 8  # SDXL-shaped: 2 down, 2 mid, 2 x 2 up transformer blocks
    assert len(attention) == len(blocks) * 2 * 4  # attn1, attn2 x q, k, v, out


def test_init_is_the_base_and_merge_adds_the_scaled_product(base):
    config = lora.LoRAConfig(rank=3, alpha=6.0, targets=("attention", "resnet"))
    factors = lora.init_factors(base, config, jax.random.PRNGKey(1))
    merged = lora.merge(base, factors, config.scale)
    for path, value in leaves_with_paths(base).items():
        np.testing.assert_array_equal(leaves_with_paths(merged)[path], value)

    factors = jax.tree.map(lambda x: x + 0.1, factors)  # b != 0
    merged = leaves_with_paths(lora.merge(base, factors, config.scale))
    modules = lora.target_modules(base, config.targets)
    conv = next(m for m in modules if m[-1] == "conv1")
    for module in (modules[0], conv):
        pair = factors
        for k in module:
            pair = pair[k]
        a, b = np.asarray(pair["lora_a"]), np.asarray(pair["lora_b"])
        kernel = "/".join((*module, "kernel"))
        w = np.asarray(leaves_with_paths(base)[kernel])
        expected = w + 2.0 * np.einsum("...r,ro->...o", a, b)
        np.testing.assert_allclose(merged[kernel], expected, rtol=1e-6, atol=1e-6)
    untouched = "down_blocks_1/attentions_0/proj_in/kernel"
    np.testing.assert_array_equal(merged[untouched], leaves_with_paths(base)[untouched])


def test_merge_refuses_factors_that_do_not_fit(base):
    config = lora.LoRAConfig(rank=2)
    factors = lora.init_factors(base, config, jax.random.PRNGKey(0))
    module = factors["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]
    module["lora_a"] = jnp.zeros((7, 2))
    with pytest.raises(ValueError, match=r"attn2/to_k: lora_a \(7, 2\), lora_b \(2, 32\) do not "
                                         r"fit the kernel \(80, 32\)"):  # fmt: skip
        lora.merge(base, factors, 1.0)


def test_peft_layout_round_trips_and_matches_peft_delta(base):
    """`to_peft` writes diffusers' names and torch layouts whose peft delta `B·A·alpha/r` (conv:
    B ∘ A) is our kernel update in torch layout; `from_peft` reads them back exactly."""
    import torch

    config = lora.LoRAConfig(rank=3, alpha=6.0, targets=("attention", "feed_forward", "resnet"))
    factors = jax.tree.map(
        lambda x: x + 0.1, lora.init_factors(base, config, jax.random.PRNGKey(2))
    )
    state, metadata = lora.to_peft(factors, config)
    name = "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_out.0"
    assert state[f"{name}.lora_A.weight"].shape == (3, 32)
    assert state[f"{name}.lora_B.weight"].shape == (32, 3)
    conv = "unet.mid_block.resnets.0.conv1"
    assert state[f"{conv}.lora_A.weight"].shape == (3, 32, 3, 3)
    assert state[f"{conv}.lora_B.weight"].shape == (32, 3, 1, 1)

    merged = weights.unet_to_diffusers(
        jax.tree.map(np.asarray, lora.merge(base, factors, config.scale)),
        _unet_config(),
    )
    plain = weights.unet_to_diffusers(jax.tree.map(np.asarray, base), _unet_config())
    for module in (name, conv):
        a = torch.tensor(state[f"{module}.lora_A.weight"])
        b = torch.tensor(state[f"{module}.lora_B.weight"])
        if a.ndim == 2:
            peft_delta = b @ a
        else:  # peft's Conv2d delta: conv2d(A viewed as (in, r, kh, kw), B) permuted back
            peft_delta = torch.nn.functional.conv2d(a.permute(1, 0, 2, 3), b).permute(1, 0, 2, 3)
        key = module.removeprefix("unet.") + ".weight"
        np.testing.assert_allclose(
            merged[key] - plain[key], config.scale * peft_delta.numpy(), rtol=1e-5, atol=1e-5
        )

    back, back_config = lora.from_peft(state, metadata, base)
    assert (back_config.rank, back_config.alpha) == (3, 6.0)
    for path, value in leaves_with_paths(factors).items():
        np.testing.assert_array_equal(leaves_with_paths(back)[path], value)


def test_from_peft_names_bad_tensors(base):
    config = lora.LoRAConfig(rank=2)
    state, metadata = lora.to_peft(lora.init_factors(base, config, jax.random.PRNGKey(0)), config)
    name = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    bad = dict(state)
    bad[f"{name}.lora_A.weight"] = np.zeros((2, 7), np.float32)
    bad["unet.nowhere.lora_A.weight"] = np.zeros((2, 2), np.float32)
    del bad[f"{name.replace('to_k', 'to_v')}.lora_B.weight"]
    with pytest.raises(weights.WeightsError) as e:
        lora.from_peft(bad, metadata, base)
    message = str(e.value)
    assert "attn2.to_k: lora_A (2, 7), lora_B (32, 2) do not fit the kernel (80, 32)" in message
    assert "unexpected 'unet.nowhere.lora_A.weight' shape (2, 2)" in message
    assert "attn2.to_v: has only lora_A" in message


def _unet_config():
    from flash_jax.models.unet import UNetConfig
    from tests import tiny_sd

    return UNetConfig.from_diffusers(tiny_sd.model_dicts("sdxl")["unet"])


# ------------------------------------------------------------------------------ methods


def method_pair(name, tiny_assets, **extra):
    module, config_module, overrides = METHODS[name]
    full = module.make(tiny_config(config_module, tiny_assets, **overrides, **extra))
    low_rank = module.make(tiny_config(config_module, tiny_assets, **overrides, **LORA, **extra))
    return full, low_rank


@pytest.mark.parametrize("name", sorted(METHODS))
def test_lora_student_starts_as_the_full_student(name, tiny_assets):
    """Every key of the trainable tree (LCM: student and target) materialises to exactly the full
    method's initial UNet (the teacher; with LCM's / guided step distillation's guidance
    projection at zero), and the trainable tree holds only factors and those extra tensors."""
    full, low_rank = method_pair(name, tiny_assets)
    full_params = full.init(jax.random.PRNGKey(0))
    params, frozen = low_rank.init(jax.random.PRNGKey(0)), low_rank.load_frozen()
    assert set(params) == set(full_params)
    for key in full_params:
        got = lora.student_unet(params[key], frozen["teacher"]["unet"], 2.0)
        expected = leaves_with_paths(full_params[key])
        assert leaves_with_paths(got).keys() == expected.keys()
        for path, value in leaves_with_paths(got).items():
            np.testing.assert_array_equal(value, expected[path])
        for path in leaves_with_paths(params[key]):
            assert (path.startswith("lora/") and path.endswith(("lora_a", "lora_b"))) or (
                path == "extra/time_embedding/cond_proj/kernel"
            ), path
    assert lora.num_params(params) < 0.2 * lora.num_params(full_params)


@pytest.mark.slow  # compiles two gradients per method (~50 s each on 2 cores)
@pytest.mark.parametrize("name", ["imagine_flash", "lcm"])
def test_gradients_reach_only_the_factors(name, tiny_assets):
    """jax.grad of the generator loss with respect to the trainable tree: at step 0 (b = 0) the
    loss's gradient flows into every b (and LCM's guidance projection), a's gradient is exactly
    zero (∂/∂a = ∂/∂W · bᵀ), LCM's target factors get none (stop-gradient); and the loss is the
    full student's, bit for bit (the same program kind: both under value_and_grad)."""
    full, low_rank = method_pair(name, tiny_assets)
    params, frozen = low_rank.init(jax.random.PRNGKey(0)), low_rank.load_frozen()
    batch, rng = make_batch(low_rank), jax.random.PRNGKey(3)
    grad_fn = jax.jit(jax.value_and_grad(low_rank.generator_loss, has_aux=True))
    (loss, _), grads = grad_fn(params, frozen, batch, rng)
    full_grad_fn = jax.jit(jax.value_and_grad(full.generator_loss, has_aux=True))
    (full_loss, _), _ = full_grad_fn(full.init(None), frozen, batch, rng)
    np.testing.assert_array_equal(loss, full_loss)
    for path, g in leaves_with_paths(grads["unet"]).items():
        if path.endswith("lora_a"):
            assert not np.any(g), path
        else:
            assert np.any(g), path
    if name == "lcm":
        assert "extra/time_embedding/cond_proj/kernel" in leaves_with_paths(grads["unet"])
        assert not any(np.any(g) for g in jax.tree.leaves(grads["target"]))


@pytest.mark.slow  # compiles the full and the LoRA training step (~1 min on 2 cores)
def test_compiled_step_holds_one_copy_of_the_base(tiny_assets):
    """XLA's argument bytes are the state, the frozen models and the batch, nothing else; the
    LoRA state is a small fraction of one UNet, so the compiled LoRA step holds the base UNet
    once (in `frozen`), where the full student's holds it five times (frozen, params, two Adam
    moments, EMA). Two real steps move the factors and leave everything else to `frozen`."""
    full, low_rank = method_pair("imagine_flash", tiny_assets)
    frozen = low_rank.load_frozen()
    batch = make_batch(low_rank)
    tx = optax.adam(1e-3)
    unet_bytes = nbytes(frozen["teacher"]["unet"])
    arguments = {}
    for label, method in (("full", full), ("lora", low_rank)):
        state = init_state(method.init(jax.random.PRNGKey(0)), tx, jax.random.PRNGKey(1))
        # keep_unused: an argument the step never reads (the VAE's decoder) is not pruned, so
        # the argument bytes are exactly those of the pytrees passed.
        step = jax.jit(
            make_train_step(method, tx, ema_decay=0.5), donate_argnums=(0,), keep_unused=True
        )
        compiled = step.lower(state, frozen, batch).compile()
        got = compiled.memory_analysis().argument_size_in_bytes
        assert got == nbytes(state) + nbytes(frozen) + nbytes(batch)
        arguments[label] = (got, nbytes(state))
        if label == "lora":
            before = jax.tree.map(np.asarray, state.params)  # the state is donated
            for _ in range(2):
                state, metrics = compiled(state, frozen, batch)
                assert float(metrics["finite"]) == 1.0
            moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params, before)
            assert max(jax.tree.leaves(moved)) > 0
    assert arguments["lora"][1] < unet_bytes  # factors, two Adam moments and EMA: < one UNet
    assert arguments["lora"][0] < nbytes(frozen) + unet_bytes  # fewer than two copies
    assert arguments["full"][1] >= 4 * unet_bytes


def test_disabled_lora_leaves_the_method_unchanged(tiny_assets):
    config = tiny_config(if_config, tiny_assets)
    params = imagine_flash.make(config).init(None)
    assert set(params) == {"unet"} and "lora" not in params["unet"]


@pytest.mark.slow  # trains 2 steps of the tiny testbed student (compiles the step: ~1 min)
def test_testbed_imagine_flash_trains_a_lora_student_from_overrides(tiny_assets, tmp_path):
    """`--config.lora.*` overrides on configs/shapes/imagine_flash.py: the run's checkpoint holds
    rank-2 factors only, they moved, and `full_unet` merges them onto the teacher's UNet."""
    from flash_jax import config as flash_config
    from flash_jax.train import checkpoint, loop

    config = flash_config.load(
        "configs/shapes/imagine_flash.py:tiny",
        [
            f"teacher_workdir={tiny_assets / 'teacher.msgpack'}",
            f"autoencoder_workdir={tiny_assets / 'autoencoder.msgpack'}",
            "lora.enabled=true",
            "lora.rank=2",
            "lora.targets=attention,feed_forward,resnet",
            "total_steps=2",
        ],
    )
    assert config.lora.targets == ("attention", "feed_forward", "resnet")
    loop.train(config, tmp_path / "run")
    ema = checkpoint.load_params(tmp_path / "run")["unet"]
    raw = checkpoint.load_params(tmp_path / "run", "params")["unet"]
    assert set(ema) == {"lora"}
    for path, value in leaves_with_paths(raw).items():
        assert value.shape[0 if path.endswith("lora_b") else -1] == 2, path
    assert any(np.any(v) for p, v in leaves_with_paths(raw).items() if p.endswith("lora_b"))
    teacher = checkpoint.load_params(config.teacher_workdir)["unet"]
    merged = lora.full_unet(ema, config, lambda: teacher)
    assert jax.tree.structure(merged) == jax.tree.structure(teacher)
    conv = "mid_block/resnets_0/conv1/kernel"
    assert np.any(leaves_with_paths(merged)[conv] != leaves_with_paths(teacher)[conv])
