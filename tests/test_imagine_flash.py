"""Imagine Flash pieces on a tiny random text-to-image model: rollout, stop-gradients, γ, SRL, D."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.shapes import imagine_flash as if_config
from flash_jax import diffusion, sampling
from flash_jax.methods import common
from flash_jax.methods import imagine_flash as ifl
from flash_jax.models import discriminator as disc_lib
from flash_jax.t2i import T2I

B = 2


@pytest.fixture(scope="module")
def setup():
    config = if_config.get_config("tiny")
    model = T2I.from_config(config)
    params = model.init(jax.random.PRNGKey(0))
    tokens = model.tokenizer()(["a red circle", "two blue stars"])
    context = model.encode_text(params["text"], tokens)
    x_T = jax.random.normal(jax.random.PRNGKey(1), model.latent_shape(B, config.data.image_size))
    ifc = ifl.ImagineFlashConfig(**config.imagine_flash.to_dict())
    return model, params, context, x_T, ifc


def test_rollout_equals_running_the_sampler(setup):
    model, params, context, x_T, _ = setup
    plans, ts = ifl.student_plans(model.schedule, (3,), noise_correction=True)
    np.testing.assert_array_equal(ts[0], [999, 666, 332])
    which = jnp.zeros((B,), jnp.int32)
    for i in range(3):
        got = ifl.rollout(
            model, params["unet"], x_T, plans, which, jnp.full((B,), i), context, True
        )
        config = sampling.SamplerConfig(num_steps=3, noise_correction=True)
        steps = {
            k: v[:i] for k, v in dataclasses.asdict(sampling.plan(model.schedule, config)).items()
        }
        expected = x_T
        if i:
            expected, _ = sampling.run_plan(
                model.apply_unet,
                params["unet"],
                x_T,
                steps,
                context,
                None,
                dataclasses.replace(config, num_steps=i),
                "epsilon",
            )
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_rollout_mixes_depths_and_step_counts_per_sample(setup):
    model, params, context, x_T, _ = setup
    plans, ts = ifl.student_plans(model.schedule, (1, 3), noise_correction=False)
    np.testing.assert_array_equal(ts, [[999, 999, 999], [999, 666, 332]])
    which, i = jnp.array([0, 1]), jnp.array([0, 2])
    got = ifl.rollout(model, params["unet"], x_T, plans, which, i, context, False)
    np.testing.assert_array_equal(got[0], x_T[0])  # depth 0: pure noise
    alone = ifl.rollout(
        model, params["unet"], x_T, plans, jnp.array([1, 1]), jnp.array([2, 2]), context, False
    )
    np.testing.assert_allclose(got[1], alone[1], atol=1e-5)


def test_no_gradient_flows_into_rollout_or_teacher(setup):
    model, params, context, x_T, ifc = setup
    ifc = dataclasses.replace(ifc, teacher_steps=1)  # one guided call: keeps the compile small
    plans, _ = ifl.student_plans(model.schedule, (2,), True)
    which, i = jnp.zeros((B,), jnp.int32), jnp.full((B,), 1)

    def through_rollout(unet):
        return jnp.sum(ifl.rollout(model, unet, x_T, plans, which, i, context, True) ** 2)

    grads = jax.grad(through_rollout)(params["unet"])
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))

    t = jnp.array([666, 332])
    uncond = jnp.zeros_like(context)

    def through_teacher(teacher_unet, x0_student):
        target, _ = ifl.srl_target(
            model, ifc, teacher_unet, x0_student, x_T, t, context, uncond, jax.random.PRNGKey(2)
        )
        return jnp.sum(target**2)

    g_teacher, g_x0 = jax.grad(through_teacher, argnums=(0, 1))(params["unet"], x_T)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_teacher))
    assert float(jnp.abs(g_x0).max()) == 0.0

    # ...while the student's own estimate does carry gradient to its parameters.
    def through_student(unet):
        return jnp.sum(common.predict_x0(model, model.apply_unet, unet, x_T, t, context)[0] ** 2)

    g_student = jax.grad(through_student)(params["unet"])
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_student)) > 0.0


@pytest.mark.parametrize(
    "kind,a,b,shift",
    [("affine", 0.75, 0.0, 0.5), ("affine", 0.5, 100.0, 0.5), ("sd3", 0.9, 0.0, 0.3)],
)
def test_gamma_is_monotone_and_below_T(kind, a, b, shift):
    t = jnp.arange(1000)
    g = np.asarray(ifl.gamma(t, kind, 1000, a, b, shift))
    assert np.all(np.diff(g) > 0)
    assert g[-1] < 999


def test_srl_target_at_tiny_t_phi_is_the_students_estimate(setup):
    """χ at t_Φ = 1 is x̂0^Θ plus σ_1 ≈ 0.04 of noise, which the teacher's one step removes up to
    its own ε error: the target is within a few σ_1 of x̂0^Θ, far closer than at high t_Φ."""
    model, params, context, x_T, ifc = setup
    ifc = dataclasses.replace(ifc, teacher_steps=1, guidance_scale=1.0)
    x0_student = jnp.tanh(x_T)  # any clean latent
    t = jnp.array([999, 999])

    def relative_gap(t_phi):
        target, _ = ifl.srl_target(
            model,
            ifc,
            params["unet"],
            x0_student,
            x_T,
            t,
            context,
            None,
            jax.random.PRNGKey(3),
            t_phi=jnp.full((B,), t_phi),
        )
        return float(jnp.linalg.norm(target - x0_student) / jnp.linalg.norm(x0_student))

    near, far = relative_gap(1), relative_gap(900)
    assert near < 0.1
    assert far > 0.5 and near < 0.25 * far  # at high t_Φ the teacher re-does the image


def test_srl_with_the_students_own_noise_at_t_phi_equal_t_is_plain_backward_distillation(setup):
    """With ε' = ε̂^Θ, χ is the student's DDIM step from t to t_Φ; at t_Φ = t that step is x_t
    itself, so the SRL target equals the no-SRL target (the teacher's solve from x_t)."""
    model, params, context, x_T, ifc = setup
    t = jnp.array([999, 666])
    x_t = x_T * 0.9
    x0_student = common.predict_x0(model, model.apply_unet, params["unet"], x_t, t, context)[0]

    def target(**changes):
        out, _ = ifl.srl_target(
            model,
            dataclasses.replace(ifc, teacher_steps=1, **changes),
            params["unet"],
            x0_student,
            x_t,
            t,
            context,
            None,
            jax.random.PRNGKey(3),
            t_phi=t if changes.get("srl", True) else None,
        )
        return np.asarray(out)

    plain = target(srl=False)
    np.testing.assert_allclose(target(srl_noise="student"), plain, atol=1e-4, rtol=1e-4)
    assert np.abs(target(srl_noise="fresh") - plain).max() > 0.1  # fresh noise: another χ


def test_srl_with_the_initial_noise_re_noises_with_x_T(setup):
    """srl_noise="x_T": χ = α_{t_Φ}·x̂0^Θ + σ_{t_Φ}·x_T, so at a 1-step student's t = T−1 with
    x̂0^Θ's own noise equal to x_T it is the "student" target; it differs from it elsewhere."""
    model, params, context, x_T, ifc = setup
    t = jnp.array([999, 999])
    a, s = model.schedule.alpha_sigma(t)
    x0 = common.predict_x0(model, model.apply_unet, params["unet"], x_T, t, context)[0]
    x_t = a[:, None, None, None] * x0 + s[:, None, None, None] * x_T  # ε̂ = x_T exactly

    def target(noise, state):
        out, _ = ifl.srl_target(
            model,
            dataclasses.replace(ifc, teacher_steps=1, srl_noise=noise),
            params["unet"],
            x0,
            state,
            t,
            context,
            None,
            jax.random.PRNGKey(3),
            x_T=x_T,
        )
        return np.asarray(out)

    np.testing.assert_allclose(target("x_T", x_t), target("student", x_t), atol=1e-4, rtol=1e-4)
    assert np.abs(target("x_T", x_t * 0.5) - target("student", x_t * 0.5)).max() > 0.01
    with pytest.raises(ValueError, match="needs the initial noise"):
        ifl.srl_target(
            model,
            dataclasses.replace(ifc, srl_noise="x_T"),
            params["unet"],
            x0,
            x_t,
            t,
            context,
            None,
            jax.random.PRNGKey(3),
        )


def test_unknown_srl_noise_is_refused():
    with pytest.raises(ValueError, match=r"imagine_flash\.srl_noise='ddim'"):
        ifl.ImagineFlashConfig(srl_noise="ddim")


def test_teacher_timesteps_descend_from_t_phi():
    ts = np.asarray(ifl.teacher_timesteps(jnp.array([749, 249]), 4))
    np.testing.assert_array_equal(ts[:, 0], [749, 562, 374, 187])
    np.testing.assert_array_equal(ts[:, 1], [249, 187, 124, 62])


def test_plan_from_timesteps_matches_numpy_plan():
    schedule = diffusion.make_schedule()
    for name in ("ddim", "dpmpp_2m"):
        config = sampling.SamplerConfig(name=name, num_steps=4)
        expected = dataclasses.asdict(sampling.plan(schedule, config))
        got = sampling.plan_from_timesteps(schedule, jnp.asarray(expected["t"]).astype(jnp.int32))
        for k in ("alpha", "sigma", "alpha_next", "sigma_next", "dpm_weight"):
            np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_hinge_losses_have_the_right_sign_on_separable_inputs():
    real, fake = jnp.full((4,), 2.0), jnp.full((4,), -2.0)
    assert float(disc_lib.hinge_discriminator_loss(real, fake)) == 0.0
    assert float(disc_lib.hinge_discriminator_loss(fake, real)) == 6.0
    assert float(disc_lib.hinge_generator_loss(fake)) > float(disc_lib.hinge_generator_loss(real))


def test_discriminator_learns_to_separate_features():
    """A few SGD steps of the hinge loss push D(real) above D(fake) on separable features."""
    d = disc_lib.Discriminator(width=8, time_dim=8)
    key = jax.random.PRNGKey(0)
    real = [jax.random.normal(key, (4, 4, 4, 8)) + 1.0]
    fake = [jax.random.normal(key, (4, 4, 4, 8)) - 1.0]
    t, pooled = jnp.zeros((4,)), jnp.zeros((4, 5))
    params = d.init(key, real, t, pooled)["params"]

    def loss(p):
        return disc_lib.hinge_discriminator_loss(
            d.apply({"params": p}, real, t, pooled), d.apply({"params": p}, fake, t, pooled)
        )

    for _ in range(30):
        params = jax.tree.map(lambda p, g: p - 0.05 * g, params, jax.grad(loss)(params))
    assert float(jnp.mean(d.apply({"params": params}, real, t, pooled))) > float(
        jnp.mean(d.apply({"params": params}, fake, t, pooled))
    )


def test_one_step_student_rollout_is_the_initial_noise(setup):
    """With N = 1 every student input is x_T itself (no sampler step is ever needed)."""
    model, params, context, x_T, _ = setup
    plans, _ = ifl.student_plans(model.schedule, (1,), noise_correction=True)
    zeros = jnp.zeros((B,), jnp.int32)
    got = ifl.rollout(model, params["unet"], x_T, plans, zeros, zeros, context, True)
    np.testing.assert_array_equal(got, x_T)


def test_step_means_and_loss_weights_in_closed_form():
    values = jnp.array([1.0, 3.0, 10.0, 4.0, 2.0])
    step = jnp.array([0, 0, 1, 2, 2])
    np.testing.assert_allclose(ifl.step_means(values, step, 4), [2.0, 10.0, 3.0, 0.0])
    schedule = diffusion.make_schedule()
    t = jnp.array([999, 999, 666, 333, 333])
    w = ifl.loss_weights(values, t, step, 4, "normalized", schedule)
    np.testing.assert_allclose(ifl.step_means(values * w, step, 4)[:3], [1.0, 1.0, 1.0])
    alpha = ifl.loss_weights(values, t, step, 4, "alpha", schedule)
    np.testing.assert_allclose(alpha, schedule.alpha_sigma(t)[0])
    assert float(ifl.loss_weights(values, t, step, 4, "uniform", schedule).sum()) == 5.0
    with pytest.raises(ValueError, match="loss_weighting='snr'"):
        ifl.ImagineFlashConfig(loss_weighting="snr")


def test_per_step_diagnostics_and_the_normalized_loss(tiny_assets):
    """With batch 16 and 3 student steps every step is drawn: the normalized loss is exactly 1
    (each step's term has mean 1), and the gradient sent into the UNet's output from step j is
    the uniform loss's divided by step j's mean loss; the logged step losses average to the
    uniform loss."""
    from flash_jax.data import shapes

    results = {}
    for kind in ("uniform", "normalized"):
        config = if_config.get_config("tiny")
        with config.unlocked():
            config.teacher_workdir = str(tiny_assets / "teacher.msgpack")
            config.autoencoder_workdir = str(tiny_assets / "autoencoder.msgpack")
            config.imagine_flash.student_steps = [3]
            config.imagine_flash.adv_weight = 0.0
            config.imagine_flash.loss_weighting = kind
        method = ifl.make(config)
        params, frozen = method.init(jax.random.PRNGKey(0)), method.load_frozen()
        examples = [shapes.make_example(0, "train", i, 16) for i in range(16)]
        batch = method.prepare_batch(
            {
                "image": np.stack([e["image"] for e in examples]),
                "caption": [e["caption"] for e in examples],
            }
        )
        loss, aux = jax.jit(method.generator_loss)(params, frozen, batch, jax.random.PRNGKey(3))
        results[kind] = (float(loss), {k: float(v) for k, v in aux.items()})
    (uniform, u_aux), (normalized, n_aux) = results["uniform"], results["normalized"]
    assert normalized == pytest.approx(1.0, rel=1e-5)
    for j in range(3):
        assert n_aux[f"srl_step{j}"] == pytest.approx(u_aux[f"srl_step{j}"], rel=1e-6)
        assert n_aux[f"grad_out_step{j}"] == pytest.approx(
            u_aux[f"grad_out_step{j}"] / u_aux[f"srl_step{j}"], rel=1e-4
        )
    step_losses = [u_aux[f"srl_step{j}"] for j in range(3)]
    assert min(step_losses) < uniform < max(step_losses)
