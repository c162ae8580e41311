"""The baselines (docs/method.md, "Baselines") on tiny random models: LCM, guided step
distillation, ADD; the generic `Method.post_update` hook; the shared guidance embedding and discriminator R1 term."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.shapes import add as add_config
from configs.shapes import imagine_flash as if_config
from configs.shapes import lcm as lcm_config
from configs.shapes import step_distill as sd_config
from flash_jax import diffusion, methods, parallel, sampling
from flash_jax.data import shapes
from flash_jax.methods import add, common, imagine_flash, lcm, step_distill
from flash_jax.models import layers
from flash_jax.t2i import T2I
from flash_jax.train import checkpoint
from flash_jax.train.state import init_state
from flash_jax.train.step import make_train_step

B = 2


def tiny_config(module, assets, variant="tiny", **overrides):
    """A tiny config of `module` on the tiny random assets; `overrides` use dotted keys."""
    config = module.get_config(variant)
    with config.unlocked():
        config.teacher_workdir = str(assets / "teacher.msgpack")
        config.autoencoder_workdir = str(assets / "autoencoder.msgpack")
        for key, value in overrides.items():
            *parents, leaf = key.split(".")
            node = config
            for p in parents:
                node = node[p]
            node[leaf] = value
    return config


def make_batch(method):
    examples = [shapes.make_example(0, "train", i, 16) for i in range(B)]
    raw = {
        "image": np.stack([e["image"] for e in examples]),
        "caption": [e["caption"] for e in examples],
    }
    return method.prepare_batch(raw)


def max_abs(tree):
    return max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tree))


def with_random_guidance_projection(params, rng):
    """A guidance-conditioned UNet whose output depends on w (the projection is zero at init)."""
    kernel = params["time_embedding"]["cond_proj"]["kernel"]
    params = jax.tree.map(lambda x: x, params)
    params["time_embedding"]["cond_proj"]["kernel"] = jax.random.normal(rng, kernel.shape)
    return params


# ------------------------------------------------------------------------------ shared pieces


def test_guidance_embedding_matches_diffusers():
    import torch
    from diffusers import LatentConsistencyModelPipeline

    w = np.array([0.0, 1.5, 3.0, 7.5], np.float32)
    for dim in (8, 9, 64):
        expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
            None, torch.from_numpy(w), dim
        ).numpy()
        # The sinusoid arguments are up to 1000·w·1 in float32: one rounding of an argument
        # (2^-24 relative, in either implementation) moves sin/cos by up to 1000·w·2^-24.
        bound = 1000.0 * w[:, None] * 2.0**-23 + 1e-6
        assert np.all(np.abs(layers.guidance_embedding(w, dim) - expected) <= bound)


def test_model_output_from_x0_inverts_the_clean_estimate():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x, x0 = jax.random.normal(k1, (3, 4)), jax.random.normal(k2, (3, 4))
    alpha, sigma = (
        jnp.array([[0.9], [0.5], [0.07]]),
        jnp.sqrt(1 - jnp.array([[0.81], [0.25], [0.0049]])),
    )
    for kind in ("epsilon", "v_prediction", "sample"):
        out = diffusion.model_output_from_x0(x0, x, alpha, sigma, kind)
        got = diffusion.predict_x0_eps(out, x, alpha, sigma, kind)[0]
        np.testing.assert_allclose(got, x0, rtol=1e-5, atol=1e-5, err_msg=kind)


def test_post_update_hook_runs_after_the_optimizer_and_feeds_the_ema():
    """A toy method: loss ‖p‖²; the hook keeps a running copy `p_slow ← ½·p_slow + ½·p`."""
    params = {"p": jnp.array([1.0, -2.0]), "p_slow": jnp.array([4.0, 4.0])}

    def loss(params, frozen, batch, rng, disc_params=None):
        return jnp.sum(params["p"] ** 2) + 0.0 * jnp.sum(params["p_slow"]), {}

    def post_update(old, new):
        return {"p": new["p"], "p_slow": 0.5 * old["p_slow"] + 0.5 * new["p"]}

    tx = optax.sgd(0.25)
    for hook in (None, post_update):
        method = methods.Method(
            init=None, load_frozen=None, generator_loss=loss, prepare_batch=None, post_update=hook
        )
        step = jax.jit(make_train_step(method, tx, ema_decay=0.5))
        state, _ = step(init_state(params, tx, jax.random.PRNGKey(0)), None, {})
        p = np.array([1.0, -2.0]) * (1 - 2 * 0.25)  # one SGD step on ‖p‖²
        slow = 0.5 * 4.0 + 0.5 * p if hook else np.array([4.0, 4.0])
        np.testing.assert_allclose(state.params["p"], p)
        np.testing.assert_allclose(state.params["p_slow"], slow)
        np.testing.assert_allclose(state.ema_params["p_slow"], 0.5 * 4.0 + 0.5 * slow)


def test_methods_get_refuses_a_helper_module():
    with pytest.raises(ValueError, match="not a method"):
        methods.get("common")


def test_r1_penalty_is_the_squared_gradient_norm_on_real_latents(tiny_assets):
    config = tiny_config(add_config, tiny_assets)
    model = T2I.from_config(config)
    teacher = jax.device_get(checkpoint.load_params(config.teacher_workdir))
    disc = common.LatentDiscriminator(model, width=8, t_max=750, r1_weight=0.5)
    empty = model.tokenizer()([""])[0]
    disc_params = disc.init(jax.random.PRNGKey(0), 16, empty)
    tokens = model.tokenizer()(["a red circle", "two blue stars"])
    context, pooled, _ = common.conditioning(model, teacher["text"], {"tokens": tokens}, empty)
    real, fake = jax.random.normal(jax.random.PRNGKey(1), (2, B, 4, 4, 4))
    k_real, k_fake = jax.random.split(jax.random.PRNGKey(2))

    @jax.jit
    def losses_and_r1(disc_params, teacher_unet):
        args = (disc_params, teacher_unet, real, fake, context, pooled, k_real, k_fake)
        loss, aux = disc.loss(*args)
        no_r1, _ = dataclasses.replace(disc, r1_weight=0.0).loss(*args)

        def d_real(x):
            return jnp.sum(disc.logits(disc_params, teacher_unet, x, context, pooled, k_real))

        grad = jax.grad(d_real)(real)
        return loss, aux["r1"], no_r1, jnp.mean(jnp.sum(grad**2, axis=(1, 2, 3)))

    loss, aux_r1, no_r1, r1 = losses_and_r1(disc_params, teacher["unet"])
    assert r1 > 0
    np.testing.assert_allclose(aux_r1, r1, rtol=1e-5)
    np.testing.assert_allclose(loss, no_r1 + 0.5 * r1, rtol=1e-5)


def test_guided_student_starts_as_the_conditional_teacher(tiny_assets):
    config = tiny_config(lcm_config, tiny_assets)
    model = T2I.from_config(config)
    student_model = common.with_guidance_input(model, 8)
    teacher = checkpoint.load_params(config.teacher_workdir)
    student = common.student_from_teacher(student_model, teacher["unet"])
    assert not np.any(student["time_embedding"]["cond_proj"]["kernel"])
    x = jax.random.normal(jax.random.PRNGKey(0), (B, 4, 4, 4))
    context = jax.random.normal(jax.random.PRNGKey(1), (B, 3, 16))
    t = jnp.array([999.0, 10.0])

    @jax.jit
    def both(teacher_unet, student):
        expected = model.apply_unet(teacher_unet, x, t, context)
        cond = {"context": context, "w": jnp.array([0.0, 5.0])}
        return common.guided_apply(student_model)(student, x, t, cond), expected

    got, expected = both(teacher["unet"], student)
    np.testing.assert_allclose(got, expected, atol=1e-5)


# ------------------------------------------------------------------------------------- LCM


def test_lcm_timesteps_and_boundary_conditions_match_diffusers():
    from diffusers import LCMScheduler

    scheduler = LCMScheduler()
    for n in (1, 2, 3, 4):
        scheduler.set_timesteps(n)
        np.testing.assert_array_equal(
            lcm.inference_timesteps(1000, 20, n), scheduler.timesteps.numpy()
        )
    np.testing.assert_array_equal(lcm.inference_timesteps(1000, 20, 3), [999, 679, 339])
    ts = np.array([0, 19, 259, 999])
    c_skip, c_out = lcm.boundary_scalings(ts, 0.5, 10.0)
    for t, a, b in zip(ts, c_skip, c_out, strict=True):
        ref = scheduler.get_scalings_for_boundary_condition_discrete(int(t))
        np.testing.assert_allclose([a, b], ref, rtol=1e-6)
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0
    np.testing.assert_array_equal(lcm.solver_timesteps(1000, 20)[[0, 1, -1]], [19, 39, 999])
    with pytest.raises(ValueError, match=r"lcm\.skip"):
        lcm.solver_timesteps(1000, 30)


@pytest.fixture(scope="module")
def lcm_setup(tiny_assets):
    config = tiny_config(lcm_config, tiny_assets)
    method = lcm.make(config)
    model = T2I.from_config(config)
    lcmc = lcm.LCMConfig(**config.lcm.to_dict())
    student_model = common.with_guidance_input(model, lcmc.w_embedding_dim)
    params = method.init(jax.random.PRNGKey(0))
    params["unet"] = with_random_guidance_projection(params["unet"], jax.random.PRNGKey(1))
    frozen = method.load_frozen()
    return config, method, model, student_model, lcmc, params, frozen


def test_lcm_sampler_matches_diffusers_and_f_is_the_identity_at_t0(lcm_setup):
    """One LCM sampling step from t = 999 equals diffusers' `LCMScheduler.step` on the same ε̂;
    the consistency function at t = 0 returns its input (c_skip(0) = 1, c_out(0) = 0)."""
    import torch
    from diffusers import LCMScheduler

    _, _, model, student_model, lcmc, params, frozen = lcm_setup
    z = jax.random.normal(jax.random.PRNGKey(3), (B, 4, 4, 4))
    tokens = model.tokenizer()(["a red circle", "two blue stars"])
    cond = {"context": model.encode_text(frozen["teacher"]["text"], tokens), "w": jnp.full(B, 3.0)}

    @jax.jit
    def run(unet, z, cond):
        sampled, _ = sampling.run_plan(
            lcm.consistency_apply(student_model, lcmc),
            unet,
            z,
            lcm.sampler_steps(model.schedule, lcmc, 1),
            cond,
            None,
            sampling.SamplerConfig(num_steps=1, eta=1.0),
            "epsilon",
            jax.random.PRNGKey(4),
        )
        eps = common.guided_apply(student_model)(unet, z, jnp.full(B, 999.0), cond)
        f0 = lcm.consistency_fn(student_model, lcmc, unet, z, jnp.zeros((B,), jnp.int32), cond)
        return sampled, eps, f0

    got, eps, f0 = run(params["unet"], z, cond)
    np.testing.assert_array_equal(f0, z)
    scheduler = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(1)
    expected = scheduler.step(
        torch.from_numpy(np.array(eps)), 999, torch.from_numpy(np.array(z))
    ).prev_sample
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_lcm_teacher_step_is_one_guided_ddim_step(lcm_setup):
    _, _, model, _, _, _, frozen = lcm_setup
    teacher = frozen["teacher"]
    z = jax.random.normal(jax.random.PRNGKey(5), (B, 4, 4, 4))
    tokens = model.tokenizer()(["a red circle", "two blue stars"])
    context, _, uncond = common.conditioning(
        model, teacher["text"], {"tokens": tokens}, model.tokenizer()([""])[0]
    )

    @jax.jit
    def both(unet):
        t, t_prev = jnp.array([499, 499]), jnp.array([479, 479])
        got = lcm.teacher_solver_step(model, unet, z, t, t_prev, context, uncond, jnp.full(B, 3.0))
        expected, _ = sampling.run_plan(
            model.apply_unet,
            unet,
            z,
            sampling.plan_from_timesteps(model.schedule, jnp.array([499, 479])),
            context,
            uncond,
            sampling.SamplerConfig(num_steps=2, guidance_scale=3.0),
            "epsilon",
            num_active=1,
        )
        return got, expected

    got, expected = both(teacher["unet"])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_lcm_post_update_is_the_target_ema(lcm_setup):
    _, method, _, _, lcmc, params, _ = lcm_setup
    new = jax.tree.map(lambda x: x + 1.0, params)
    kept = method.post_update(params, new)
    assert kept["unet"] is new["unet"]
    for old, student, target in zip(
        *(jax.tree.leaves(x) for x in (params["target"], new["unet"], kept["target"])),
        strict=True,
    ):
        np.testing.assert_allclose(
            target, lcmc.target_decay * old + (1 - lcmc.target_decay) * student, rtol=1e-6
        )


# ------------------------------------------------------------------------- step distillation


def test_progressive_grids_interleave():
    t, mid, nxt = step_distill.progressive_timesteps(1000, 4)
    np.testing.assert_array_equal(t, [999, 749, 499, 249])
    np.testing.assert_array_equal(mid, [874, 624, 374, 124])
    np.testing.assert_array_equal(nxt, [749, 499, 249, -1])
    for n in (16, 8):  # the testbed chain 32 → 16 → 8 → 4
        step_distill.progressive_timesteps(1000, n)


def test_two_step_target_of_one_teacher_step_is_its_estimate():
    """Closed form: if z'' is one DDIM step of estimate x̂, the target is x̂ itself (stage 1)."""
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    z, x0 = jax.random.normal(k[0], (B, 4, 4, 4)), jax.random.normal(k[1], (B, 4, 4, 4))
    alpha, sigma, alpha2, sigma2 = 0.3, np.sqrt(1 - 0.09), 0.8, 0.6
    z2 = sampling.ddim_update(x0, (z - alpha * x0) / sigma, alpha2, sigma2)
    got = step_distill.two_step_target(z, z2, alpha, sigma, alpha2, sigma2)
    np.testing.assert_allclose(got, x0, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def sd_setup(tiny_assets):
    config = tiny_config(sd_config, tiny_assets)
    model = T2I.from_config(config)
    student_model = common.with_guidance_input(model, config.step_distill.w_embedding_dim)
    teacher = checkpoint.load_params(config.teacher_workdir)
    unet = common.student_from_teacher(student_model, teacher["unet"])
    unet = with_random_guidance_projection(unet, jax.random.PRNGKey(1))
    return config, model, student_model, teacher, unet


def test_step_distillation_target_equals_two_teacher_ddim_steps(sd_setup):
    """x̃ from `teacher_two_steps` + `two_step_target` against the project's DDIM sampler run
    independently for the teacher's steps 2i, 2i+1 of its 2N-step plan: the teacher lands on the
    same z'', and ONE student DDIM step with estimate x̃ lands on z'' too."""
    _, model, student_model, _, unet = sd_setup
    schedule, n = model.schedule, 2
    apply_fn = common.guided_apply(student_model)
    cond = {
        "context": jax.random.normal(jax.random.PRNGKey(2), (B, 3, 16)),
        "w": jnp.array([1.0, 4.0]),
    }
    z = jax.random.normal(jax.random.PRNGKey(3), (B, 4, 4, 4))
    teacher_plan = dataclasses.asdict(
        sampling.plan(schedule, sampling.SamplerConfig(num_steps=2 * n))
    )
    grids = step_distill.progressive_timesteps(1000, n)
    two_steps = jax.jit(step_distill.teacher_two_steps, static_argnums=(0, 1))
    run_plan = jax.jit(sampling.run_plan, static_argnums=(0, 6, 7))
    for i in range(n):
        t, t_mid, t_next = (jnp.full((B,), g[i]) for g in grids)
        got_z = two_steps(student_model, apply_fn, unet, z, t, t_mid, t_next, cond)
        steps = {k: v[2 * i : 2 * i + 2] for k, v in teacher_plan.items()}
        expected_z, _ = run_plan(
            apply_fn, unet, z, steps, cond, None, sampling.SamplerConfig(num_steps=2), "epsilon"
        )
        np.testing.assert_allclose(got_z, expected_z, rtol=1e-4, atol=1e-4)
        alpha, sigma = common.alpha_sigma(schedule, t)
        a2, s2 = step_distill.alpha_sigma_or_clean(schedule, t_next)
        target = step_distill.two_step_target(z, expected_z, alpha, sigma, a2, s2)
        one_step = sampling.ddim_update(target, (z - alpha * target) / sigma, a2, s2)
        np.testing.assert_allclose(one_step, expected_z, rtol=1e-3, atol=1e-3)
        if i == n - 1:  # the last step lands on the clean signal: the target is z'' itself
            np.testing.assert_allclose(target, expected_z, rtol=1e-5, atol=1e-5)


def test_progressive_stage_refuses_a_previous_run_of_the_wrong_step_count(tmp_path, tiny_assets):
    (tmp_path / "config.json").write_text(json.dumps({"step_distill": {"student_steps": 16}}))
    config = tiny_config(
        sd_config, tiny_assets, "tiny,4", **{"step_distill.previous_workdir": str(tmp_path)}
    )
    with pytest.raises(ValueError, match="16-step student; a 4-step stage needs the 8-step one"):
        step_distill.make(config).init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="previous_workdir is empty"):
        step_distill.make(tiny_config(sd_config, tiny_assets, "tiny,4"))


# ------------------------------------------------------------------------------------- ADD


def test_add_distillation_term_is_alpha_weighted_and_stops_at_the_teacher(tiny_assets):
    """Per sample `α_t·mean((x̂θ − x̂ψ)²)` with x̂ψ from separate conditional / unconditional teacher
    calls; its gradient w.r.t. x̂θ is the closed form `2·α_t·(x̂θ − x̂ψ)/(B·n)` (no teacher path)."""
    config = tiny_config(add_config, tiny_assets)
    model = T2I.from_config(config)
    teacher = checkpoint.load_params(config.teacher_workdir)["unet"]
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x0 = jax.random.normal(k[0], (B, 4, 4, 4))
    noise = jax.random.normal(k[1], (B, 4, 4, 4))
    context, uncond = jax.random.normal(k[2], (2, B, 3, 16))
    t = jnp.array([100, 900])

    def distill(x, p):
        return add.distillation_loss(model, p, x, t, noise, context, uncond, 3.0)

    @jax.jit
    def run(x0, teacher):
        loss, per_sample = distill(x0, teacher)
        alpha, sigma = common.alpha_sigma(model.schedule, t)
        noisy = alpha * x0 + sigma * noise
        eps_c = model.apply_unet(teacher, noisy, t.astype(jnp.float32), context)
        eps_u = model.apply_unet(teacher, noisy, t.astype(jnp.float32), uncond)
        target = (noisy - sigma * (eps_u + 3.0 * (eps_c - eps_u))) / alpha
        grads = jax.grad(lambda x, p: distill(x, p)[0], argnums=(0, 1))(x0, teacher)
        return loss, per_sample, target, grads

    loss, per_sample, target, (grad_x0, grad_teacher) = run(x0, teacher)
    alpha = common.alpha_sigma(model.schedule, t)[0]
    expected = alpha.reshape(-1) * jnp.mean((x0 - target) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(per_sample, expected, rtol=1e-4)
    np.testing.assert_allclose(loss, jnp.mean(expected), rtol=1e-4)

    closed_form = 2 * alpha * (x0 - target) / (B * x0[0].size)
    np.testing.assert_allclose(grad_x0, closed_form, rtol=1e-3, atol=1e-6)
    assert max_abs(grad_teacher) == 0.0


# --------------------------------------------------------------------------------- trainer


def train_steps(method, params, frozen, batch, num_steps=2, disc_params=None):
    """`num_steps` updates of the generic compiled step (plain SGD: an unchanged leaf had a zero
    gradient); returns the states after each step and the metrics."""
    tx = optax.sgd(1e-3)
    step = jax.jit(make_train_step(method, tx, ema_decay=0.5, disc_tx=tx if disc_params else None))
    states = [init_state(params, tx, jax.random.PRNGKey(0), disc_params, tx)]
    records = []
    for _ in range(num_steps):
        state, metrics = step(states[-1], frozen, batch)
        states.append(state)
        records.append(jax.device_get(metrics))
    return states, records


@pytest.mark.slow
def test_lcm_trains_and_its_target_network_gets_no_gradient(lcm_setup):
    """Two real trainer steps without the EMA hook: the online student moves, the target network
    (in the trainable pytree, used only under stop-gradient) has exactly zero gradient."""
    _, method, _, _, _, params, frozen = lcm_setup
    method = dataclasses.replace(method, post_update=None)
    states, records = train_steps(method, params, frozen, make_batch(method))
    assert all(r["finite"] == 1.0 and np.isfinite(r["loss"]) for r in records)
    last = states[-1].params
    for before, after in zip(*(jax.tree.leaves(p["target"]) for p in (params, last)), strict=True):
        np.testing.assert_array_equal(before, after)
    assert max_abs(jax.tree.map(jnp.subtract, last["unet"], params["unet"])) > 0


@pytest.mark.slow
def test_add_trains_with_its_discriminator(tiny_assets):
    method = add.make(tiny_config(add_config, tiny_assets))
    disc_params = method.init_discriminator(jax.random.PRNGKey(1))
    batch = make_batch(method)
    states, records = train_steps(
        method, method.init(None), method.load_frozen(), batch, disc_params=disc_params
    )
    assert all(r["finite"] == 1.0 and np.isfinite(r["disc_loss"]) for r in records)
    assert {"distill", "adv", "disc_real", "disc_fake"} <= set(records[0])
    assert max_abs(jax.tree.map(jnp.subtract, states[-1].disc_params, disc_params)) > 0


@pytest.mark.slow
def test_step_distillation_progressive_stage_trains_from_the_previous_run(
    sd_setup, tiny_assets, tmp_path
):
    """A guidance-stage run folder (config.json + checkpoint, as the trainer writes them) feeds a
    4-step halving stage: its student and teacher start as that run's EMA student; two real
    trainer steps are finite. (The guidance stage's own loss is traced, not compiled.)"""
    first = tiny_config(sd_config, tiny_assets, **{"step_distill.student_steps": 8})
    guidance = step_distill.make(first)
    batch = make_batch(guidance)
    state = init_state(guidance.init(None), optax.identity(), jax.random.PRNGKey(0))
    jax.eval_shape(
        make_train_step(guidance, optax.identity(), ema_decay=0.5),
        state,
        guidance.load_frozen(),
        batch,
    )
    previous = tmp_path / "guidance"
    previous.mkdir()
    (previous / "config.json").write_text(first.to_json())
    student = sd_setup[-1]  # a w-conditioned student whose output depends on w
    manager = checkpoint.make_manager(previous / "checkpoints", async_save=False)
    checkpoint.save(
        manager, init_state({"unet": student}, optax.identity(), jax.random.PRNGKey(0)), {}
    )
    manager.close()

    config = tiny_config(
        sd_config, tiny_assets, "tiny,4", **{"step_distill.previous_workdir": str(previous)}
    )
    method = step_distill.make(config)
    params, frozen = method.init(None), method.load_frozen()
    for a, b, c in zip(
        *(jax.tree.leaves(x) for x in (student, params["unet"], frozen["teacher"]["unet"])),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    states, records = train_steps(method, params, frozen, batch)
    assert all(r["finite"] == 1.0 and np.isfinite(r["loss"]) for r in records)
    assert max_abs(jax.tree.map(jnp.subtract, states[-1].params, params)) > 0


# ------------------------------------------------------- every distillation: mesh and cached data

DISTILLATIONS = {
    "imagine_flash": (imagine_flash, if_config),
    "lcm": (lcm, lcm_config),
    "step_distill": (step_distill, sd_config),
    "add": (add, add_config),
}


def _path(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


@pytest.mark.parametrize("name", sorted(DISTILLATIONS))
def test_every_kernel_has_logical_axes(name, tiny_assets):
    """What the trainer shards by `config.sharding_rules`: every kernel of the trainable and
    frozen trees (LCM's target network included) matches an annotated kernel of the same shape
    by path suffix (`parallel.tree_shardings`); the rest would fall back to size-based FSDP."""
    module, config_module = DISTILLATIONS[name]
    method = module.make(tiny_config(config_module, tiny_assets))
    table = parallel.annotation_table(method.logical_axes())
    trees = {"params": jax.eval_shape(method.init, jax.random.PRNGKey(0))}
    trees["frozen"] = method.load_frozen()
    kernels = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(trees)[0]:
        key = _path(path)
        if key[-1] != "kernel":
            continue
        kernels += 1
        suffixes = [key[i:] for i in range(len(key)) if key[i:] in table]
        assert suffixes, f"{name}: {'/'.join(key)} has no logical axes"
        assert table[suffixes[0]][0] == tuple(leaf.shape), "/".join(key)
    assert kernels > 50


def cached(method, model, frozen, batch):
    """`batch` as the latent cache (flash_jax/data/cache.py) writes it, from the same frozen VAE
    and text encoder: posterior moments and prompt embeddings instead of images."""
    mean, std = jax.jit(model.latent_moments)(frozen["vae"], batch["image"])
    embeds, pooled = jax.jit(model.embed_prompts)(frozen["teacher"]["text"], batch["tokens"])
    raw = {
        "latent_mean": mean,
        "latent_std": std,
        "prompt_embeds": embeds,
        "pooled_prompt_embeds": pooled,
        "tokens": batch["tokens"],
    }
    return method.prepare_batch(jax.tree.map(np.asarray, raw))


@pytest.mark.slow
def test_cached_batches_give_the_losses_of_raw_batches(tiny_assets):
    """A batch of cached latents and embeddings gives the losses of the raw batch it was made
    from: the cache's posterior sample `mean + std·ε` uses the same ε as the VAE encoder's. ADD
    stands for every method: all read batches through `T2I.batch_latents` and
    `common.conditioning`, and ADD also feeds them to its discriminator."""
    module, config_module = DISTILLATIONS["add"]
    config = tiny_config(config_module, tiny_assets)
    method, model = module.make(config), T2I.from_config(config)
    params, frozen = method.init(jax.random.PRNGKey(0)), method.load_frozen()
    raw = make_batch(method)
    batch = cached(method, model, frozen, raw)
    assert "image" not in batch
    disc = method.init_discriminator(jax.random.PRNGKey(1)) if method.init_discriminator else None
    rng = jax.random.PRNGKey(2)

    @jax.jit
    def losses(batch):
        loss, aux = method.generator_loss(params, frozen, batch, rng, disc)
        out = {"loss": loss} | {k: v for k, v in aux.items() if k != "fake"}
        if disc is not None:
            out["disc"] = method.discriminator_loss(disc, aux["fake"], frozen, batch, rng)[0]
        return out

    from_raw, from_cache = losses(raw), losses(batch)
    assert set(from_raw) == set(from_cache)
    for k in from_raw:  # float32 rounding of the latents, through a random UNet
        np.testing.assert_allclose(from_cache[k], from_raw[k], rtol=1e-4, err_msg=k)
