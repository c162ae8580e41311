"""Schedules and samplers against diffusers' schedulers (the numerical reference), step by step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from flash_jax import diffusion, sampling

SHAPE = (2, 4, 4, 3)  # NHWC


def fake_model(params, x, t, context):
    """A deterministic nonlinear 'network' that roughly predicts the noise in x (so x̂0 stays O(1),
    as with a trained model); depends on x, t and the conditioning."""
    t = t.reshape(-1, 1, 1, 1)
    return params["a"] * x + params["b"] * jnp.tanh(x) * jnp.sin(t / 300.0) + context


def fake_model_torch(params, x, t, context):
    return params["a"] * x + params["b"] * torch.tanh(x) * np.sin(float(t) / 300.0) + context


PARAMS = {"a": 0.9, "b": 0.1}
CONTEXT = np.linspace(-0.05, 0.05, SHAPE[0], dtype=np.float32).reshape(-1, 1, 1, 1)


def _noise(seed=0, shape=SHAPE):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _to_nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _to_nhwc(x):
    return np.transpose(x.numpy(), (0, 2, 3, 1))


SCHEDULES = [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
    ),
]


@pytest.mark.parametrize("kw", SCHEDULES)
def test_schedule_matches_diffusers(kw):
    ours = diffusion.make_schedule(**kw)
    ref = DDIMScheduler(**kw).alphas_cumprod.numpy()
    np.testing.assert_allclose(ours.alphas_cumprod, ref, rtol=2e-6, atol=1e-7)
    if kw.get("rescale_betas_zero_snr"):
        assert ours.alphas_cumprod[-1] == 0.0


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("n", [1, 3, 4, 25, 50])
def test_timesteps_match_diffusers(spacing, n):
    ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    ref.set_timesteps(n)
    ours = diffusion.timesteps_for(1000, n, spacing, 1 if spacing == "leading" else 0)
    np.testing.assert_array_equal(ours, ref.timesteps.numpy())


def test_trailing_three_steps_start_at_last_timestep():
    np.testing.assert_array_equal(diffusion.timesteps_for(1000, 3, "trailing"), [999, 666, 332])


@pytest.mark.parametrize(
    "kw,spacing,eta",
    [
        (SCHEDULES[0], "leading", 0.0),
        (SCHEDULES[0], "trailing", 0.0),
        (SCHEDULES[0], "linspace", 0.5),
        (SCHEDULES[3], "trailing", 0.0),
        (SCHEDULES[3], "trailing", 1.0),
    ],
)
def test_ddim_step_by_step_matches_diffusers(kw, spacing, eta):
    """Each DDIM step (diffusers' own rule t → t − T//N) equals ours given the same (α, σ)."""
    n = 5
    ref = DDIMScheduler(**kw, timestep_spacing=spacing, clip_sample=False, set_alpha_to_one=True)
    ref.set_timesteps(n)
    schedule = diffusion.make_schedule(**kw)
    acp = schedule.alphas_cumprod.astype(np.float64)
    x = _noise()
    for i, t in enumerate(ref.timesteps.numpy()):
        out = fake_model_torch(PARAMS, _to_nchw(x), t, _to_nchw(CONTEXT))
        z = _noise(100 + i)
        expected = ref.step(out, int(t), _to_nchw(x), eta=eta, variance_noise=_to_nchw(z))
        expected = _to_nhwc(expected.prev_sample)
        prev = t - 1000 // n
        acp_t, acp_n = acp[t], (acp[prev] if prev >= 0 else 1.0)
        std = eta * np.sqrt((1 - acp_n) / (1 - acp_t) * (1 - acp_t / acp_n))
        a, s = np.sqrt(acp_t), np.sqrt(1 - acp_t)
        x0, eps = diffusion.predict_x0_eps(_to_nhwc(out), x, a, s, schedule.prediction_type)
        got = sampling.ddim_update(x0, eps, np.sqrt(acp_n), np.sqrt(1 - acp_n), std, z)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        x = expected


def _reference_trajectory(scheduler, x):
    """States after each step of a diffusers scheduler driven by the fake model."""
    states = []
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        out = fake_model_torch(PARAMS, model_in, t, _to_nchw(CONTEXT))
        x = scheduler.step(out, t, x).prev_sample
        states.append(x)
    return states


def _our_states(schedule, config, x_T):
    steps = dataclasses.asdict(sampling.plan(schedule, config))
    run = jax.jit(
        lambda k: sampling.run_plan(
            fake_model,
            PARAMS,
            x_T,
            steps,
            CONTEXT,
            None,
            config,
            schedule.prediction_type,
            num_active=k,
        )[0]
    )
    return [np.asarray(run(k)) for k in range(1, config.num_steps + 1)]


@pytest.mark.parametrize("kw", [SCHEDULES[0], SCHEDULES[3]])
def test_ddim_loop_matches_diffusers_leading(kw):
    """With 'leading' spacing both step rules coincide: whole trajectories agree."""
    n = 4
    ref = DDIMScheduler(**kw, timestep_spacing="leading", clip_sample=False, set_alpha_to_one=True)
    ref.set_timesteps(n)
    x_T = _noise(1)
    expected = [_to_nhwc(s) for s in _reference_trajectory(ref, _to_nchw(x_T))]
    config = sampling.SamplerConfig(name="ddim", num_steps=n, spacing="leading")
    got = _our_states(diffusion.make_schedule(**kw), config, x_T)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [SCHEDULES[0], SCHEDULES[3]])
@pytest.mark.parametrize("n", [2, 3, 6])
def test_dpmpp_2m_matches_diffusers(kw, n):
    ref = DPMSolverMultistepScheduler(**kw, timestep_spacing="trailing")
    ref.set_timesteps(n)
    x_T = _noise(2)
    expected = [_to_nhwc(s) for s in _reference_trajectory(ref, _to_nchw(x_T))]
    config = sampling.SamplerConfig(name="dpmpp_2m", num_steps=n, spacing="trailing")
    got = _our_states(diffusion.make_schedule(**kw), config, x_T)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=0, err_msg=f"step {i}")


@pytest.mark.parametrize("kw", [SCHEDULES[0], SCHEDULES[3]])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_euler_matches_diffusers(kw, spacing):
    n = 5
    ref = EulerDiscreteScheduler(**kw, timestep_spacing=spacing)
    ref.set_timesteps(n)
    x_T = _noise(3)
    # diffusers' Euler works on x/α (variance exploding); ours on x (variance preserving).
    alpha_first = 1.0 / np.sqrt(ref.sigmas[0].item() ** 2 + 1.0)
    x_ve = _to_nchw(x_T / alpha_first)
    expected = []
    for t in ref.timesteps:
        model_in = ref.scale_model_input(x_ve, t)
        out = fake_model_torch(PARAMS, model_in, t.item(), _to_nchw(CONTEXT))
        x_ve = ref.step(out, t, x_ve).prev_sample
        expected.append(x_ve)
    config = sampling.SamplerConfig(name="euler", num_steps=n, spacing=spacing)
    got = _our_states(diffusion.make_schedule(**kw), config, x_T)
    # The final state (σ = 0) is the clean sample in both parameterisations.
    np.testing.assert_allclose(got[-1], _to_nhwc(expected[-1]), atol=1e-5, rtol=0)


def test_cfg_rescale_matches_diffusers():
    u, c = _noise(4), _noise(5) * 1.3 + 0.1
    for scale, phi in [(7.5, 0.0), (7.5, 0.7), (1.0, 0.7)]:
        ours = sampling.classifier_free_guidance(jnp.asarray(u), jnp.asarray(c), scale, phi)
        guided = _to_nchw(u) + scale * (_to_nchw(c) - _to_nchw(u))
        ref = rescale_noise_cfg(guided, _to_nchw(c), guidance_rescale=phi)
        np.testing.assert_allclose(np.asarray(ours), _to_nhwc(ref), atol=1e-5, rtol=1e-5)


def test_guided_sampling_uses_one_batched_call_per_step():
    calls = []

    def counting_model(params, x, t, context):
        calls.append(x.shape[0])
        return fake_model(params, x, t, context)

    schedule = diffusion.make_schedule()
    config = sampling.SamplerConfig(num_steps=3, guidance_scale=5.0)
    steps = dataclasses.asdict(sampling.plan(schedule, config))
    x_T = _noise(6)
    jax.make_jaxpr(
        lambda: sampling.run_plan(
            counting_model, PARAMS, x_T, steps, CONTEXT, -CONTEXT, config, "epsilon"
        )
    )()
    assert calls == [2 * SHAPE[0]]  # traced once inside the scan, on [uncond; cond]


def test_noise_correction_changes_only_the_first_direction_term():
    """Noise correction (docs/method.md): step 1 uses x_T instead of ε̂ in the direction term;
    nothing else changes."""
    schedule = diffusion.make_schedule()  # SD's ε-prediction schedule: ᾱ_{T−1} > 0
    plain = sampling.SamplerConfig(num_steps=3, spacing="trailing")
    corrected = dataclasses.replace(plain, noise_correction=True)
    x_T = _noise(7)
    states_plain = _our_states(schedule, plain, x_T)
    states_nc = _our_states(schedule, corrected, x_T)

    # First step: the difference is exactly σ_next·(x_T − ε̂), with ε̂ the model's own estimate.
    p = sampling.plan(schedule, plain)
    eps = fake_model(PARAMS, x_T, jnp.full((SHAPE[0],), p.t[0]), CONTEXT)
    np.testing.assert_allclose(
        states_nc[0] - states_plain[0], p.sigma_next[0] * (x_T - eps), atol=1e-5
    )
    assert np.abs(states_nc[0] - states_plain[0]).max() > 1e-2  # it does change something

    # Later steps are the plain sampler continued from the corrected state.
    rest = {k: v[1:] for k, v in dataclasses.asdict(p).items()}
    plain_2 = dataclasses.replace(plain, num_steps=2)
    continued = sampling.run_plan(
        fake_model, PARAMS, jnp.asarray(states_nc[0]), rest, CONTEXT, None, plain_2, "epsilon"
    )[0]
    np.testing.assert_allclose(states_nc[-1], continued, atol=1e-5)


def test_noise_correction_is_identity_for_v_prediction_at_zero_terminal_snr():
    """With ᾱ_{T−1} = 0 a v-model's ε̂ = α·v + σ·x is exactly x_T: nothing to correct."""
    schedule = diffusion.make_schedule(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    x_T = _noise(8)
    plain, nc = (
        _our_states(schedule, sampling.SamplerConfig(num_steps=3, noise_correction=flag), x_T)
        for flag in (False, True)
    )
    np.testing.assert_allclose(plain[-1], nc[-1], atol=1e-6)


def test_sample_rejects_guidance_without_uncond():
    with pytest.raises(ValueError, match="uncond"):
        sampling.sample(
            fake_model,
            PARAMS,
            _noise(),
            diffusion.make_schedule(),
            sampling.SamplerConfig(guidance_scale=3.0),
            cond=CONTEXT,
        )


def test_x0_from_eps_is_finite_at_zero_terminal_snr():
    schedule = diffusion.make_schedule(rescale_betas_zero_snr=True)
    a, s = schedule.alpha_sigma(jnp.array(999))
    assert float(a) == 0.0
    x0 = diffusion.x0_from_eps(jnp.ones(3), jnp.zeros(3), a, s)
    assert np.isfinite(np.asarray(x0)).all()


def test_prediction_conversions_round_trip():
    x0, eps = _noise(9), _noise(10)
    a, s = np.float32(0.6), np.float32(0.8)
    x = diffusion.add_noise(x0, eps, a, s)
    v = diffusion.v_target(x0, eps, a, s)
    for kind, out in [("epsilon", eps), ("v_prediction", v), ("sample", x0)]:
        got_x0, got_eps = diffusion.predict_x0_eps(jnp.asarray(out), x, a, s, kind)
        np.testing.assert_allclose(got_x0, x0, atol=1e-5)
        np.testing.assert_allclose(got_eps, eps, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weight_gives_min_snr_times_x0_error(prediction_type):
    """For an output that implies the estimate x̂0 at x_t, weight · ‖output − target‖² must equal
    min(SNR, γ) · ‖x̂0 − x0‖², with SNR = α²/σ², for every parameterisation."""
    schedule = diffusion.make_schedule(prediction_type=prediction_type)
    t = jnp.array([0, 10, 120, 500, 999])
    alpha, sigma = (a.reshape(-1, 1, 1, 1) for a in schedule.alpha_sigma(t))
    shape = (t.shape[0], 4, 4, 3)
    x0, eps, x0_hat = (jnp.asarray(_noise(seed, shape)) for seed in (1, 2, 3))
    x_t = diffusion.add_noise(x0, eps, alpha, sigma)
    eps_hat = diffusion.eps_from_x0(x_t, x0_hat, alpha, sigma)
    outputs = {
        "epsilon": (eps_hat, eps),
        "v_prediction": (
            diffusion.v_target(x0_hat, eps_hat, alpha, sigma),
            diffusion.v_target(x0, eps, alpha, sigma),
        ),
        "sample": (x0_hat, x0),
    }
    output, target = outputs[prediction_type]
    gamma = 5.0
    weight = diffusion.min_snr_weight(alpha, sigma, gamma, prediction_type)
    snr = (alpha / sigma) ** 2
    got = weight * jnp.mean((output - target) ** 2, axis=(1, 2, 3), keepdims=True)
    want = jnp.minimum(snr, gamma) * jnp.mean((x0_hat - x0) ** 2, axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(got, want, rtol=2e-4)
