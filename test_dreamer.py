"""The specification of dreamer.py: each test checks one claim of the paper (or of the official
code) against an independent computation, and each can fail. Run: python -m pytest -q

Most tests use the small `tiny` networks; the parameter-count test builds the paper's sizes.
The end-to-end tests train on a real dm_control task (reacher_easy) with short episodes.
"""
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import importlib.util

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
# The file under test: dreamer.py beside this file, or a student's copy made by
# `python dreamer.py --make-exercise NAMES --out FILE` and named by the environment variable
# DREAMER_FILE. The same tests grade both: `DREAMER_FILE=FILE python -m pytest -k NAME`.
DREAMER_FILE = Path(os.environ.get("DREAMER_FILE") or HERE / "dreamer.py").resolve()
_spec = importlib.util.spec_from_file_location("dreamer", DREAMER_FILE)
d = importlib.util.module_from_spec(_spec)
sys.modules["dreamer"] = d
_spec.loader.exec_module(d)


def tiny_config(**overrides):
    return d.Config(**{**d.PRESETS["tiny"], **overrides})


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def identical(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def fake_batch(cfg, action_dim=2, B=3, L=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randint(0, 256, (B, L, 3, 64, 64), generator=g, dtype=torch.uint8),
            "action": torch.rand(B, L, action_dim, generator=g) * 2 - 1,
            "reward": torch.randn(B, L, generator=g)}


# ---------------------------------------------------------------------------------------------
# Value estimates (Eq. 5, Eq. 6)
# ---------------------------------------------------------------------------------------------

def explicit_lambda_return(r, v, bootstrap, gamma, lam):
    """Eq. 5 and Eq. 6 written out as sums, in float64 numpy, one start τ at a time.
    r, v: [T] rewards r(s_τ) and values v(s_τ); v(s_T) = bootstrap."""
    T = len(r)
    values = np.append(v, bootstrap)                 # v(s_0) … v(s_T)

    def v_n(tau, k):                                 # (Eq. 5) V_N^k(s_τ), h = min(τ + k, T)
        h = min(tau + k, T)
        return sum(gamma ** (n - tau) * r[n] for n in range(tau, h)) + gamma ** (h - tau) * values[h]

    out = []
    for tau in range(T):
        H = T - tau                                   # steps left to the end of imagination
        total = (1 - lam) * sum(lam ** (n - 1) * v_n(tau, n) for n in range(1, H))
        out.append(total + lam ** (H - 1) * v_n(tau, H))   # (Eq. 6)
    return np.array(out)


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 0.5), (0.7, 0.0), (0.8, 1.0), (0.0, 0.6)])
def test_lambda_return_equals_explicit_eq5_eq6_sum(gamma, lam):
    rng = np.random.default_rng(0)
    T, N = 9, 4
    r, v, boot = rng.normal(size=(T, N)), rng.normal(size=(T, N)), rng.normal(size=N)
    got = d.lambda_return(torch.tensor(r), torch.tensor(v), gamma * torch.ones(T, N, dtype=torch.float64),
                          torch.tensor(boot), lam).numpy()
    for n in range(N):
        np.testing.assert_allclose(got[:, n], explicit_lambda_return(r[:, n], v[:, n], boot[n],
                                                                     gamma, lam), rtol=1e-10)


def explicit_nstep(r, v, disc, boot, k):
    """(Eq. 5) with per-step discounts, as a float64 loop: V_N^k(s_τ) = Σ_{n=τ}^{h−1}
    (Π_{m=τ}^{n−1} d_m)·r_n + (Π_{m=τ}^{h−1} d_m)·v(s_h), h = min(τ + k, T), v(s_T) = bootstrap.
    r, v, disc: [T, N]; boot: [N] → [T, N]."""
    T, N = r.shape
    values = np.concatenate([v, boot[None]], 0)
    out = np.zeros((T, N))
    for n in range(N):
        for tau in range(T):
            h = min(tau + k, T)
            out[tau, n] = sum(np.prod(disc[tau:i, n]) * r[i, n] for i in range(tau, h)) \
                + np.prod(disc[tau:h, n]) * values[h, n]
    return out


def per_step_discounts(rng, T, N):
    disc = rng.uniform(0.5, 1.0, size=(T, N))
    disc[3, 1] = 0.0                             # an imagined end: nothing after it counts
    return disc


def test_nstep_return_is_eq5_with_per_step_discounts():
    rng = np.random.default_rng(2)
    T, N = 7, 3
    r, v, boot = rng.normal(size=(T, N)), rng.normal(size=(T, N)), rng.normal(size=N)
    disc = per_step_discounts(rng, T, N)
    for k in (1, 3, T):
        got = d.nstep_return(*map(torch.tensor, (r, v, disc, boot)), k)
        np.testing.assert_allclose(got.numpy(), explicit_nstep(r, v, disc, boot, k), rtol=1e-9)


def test_lambda_return_is_the_eq6_mix_of_eq5_with_per_step_discounts():
    """Eq. 6 as the explicit λ-weighted mix of explicit Eq. 5 terms (no code under test in the
    reference), with a different discount at every step and one discount of 0."""
    rng = np.random.default_rng(3)
    T, N, lam = 7, 3, 0.8
    r, v, boot = rng.normal(size=(T, N)), rng.normal(size=(T, N)), rng.normal(size=N)
    disc = per_step_discounts(rng, T, N)
    mix = np.stack([(1 - lam) * sum(lam ** (n - 1) * explicit_nstep(
                        r[t:], v[t:], disc[t:], boot, n)[0] for n in range(1, T - t))
                    + lam ** (T - t - 1) * explicit_nstep(r[t:], v[t:], disc[t:], boot, T - t)[0]
                    for t in range(T)])
    got = d.lambda_return(*map(torch.tensor, (r, v, disc, boot)), lam)
    np.testing.assert_allclose(got.numpy(), mix, rtol=1e-9)


def test_reward_sum_is_eq4_undiscounted_sum_to_the_horizon():
    r = np.random.default_rng(4).normal(size=(7, 3))
    np.testing.assert_allclose(d.reward_sum(torch.tensor(r)).numpy(),
                               np.array([r[t:].sum(0) for t in range(7)]))


def test_lambda_return_special_cases():
    rng = np.random.default_rng(1)
    T = 6
    r, v, boot = (torch.tensor(x) for x in (rng.normal(size=T), rng.normal(size=T), rng.normal()))
    g = 0.9 * torch.ones(T, dtype=torch.float64)
    # λ = 0: one-step target r_t + γ·v_{t+1}.
    one_step = r + 0.9 * torch.cat([v[1:], boot[None]])
    torch.testing.assert_close(d.lambda_return(r, v, g, boot, 0.0), one_step)
    # λ = 1: discounted sum of rewards plus the discounted bootstrap; the values are unused.
    mc = torch.stack([sum(0.9 ** (n - t) * r[n] for n in range(t, T)) + 0.9 ** (T - t) * boot
                      for t in range(T)])
    torch.testing.assert_close(d.lambda_return(r, v, g, boot, 1.0), mc)
    # γ = 0: the rewards alone.
    torch.testing.assert_close(d.lambda_return(r, v, 0 * g, boot, 0.95), r)


# ---------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------

def test_parameter_counts_equal_official_implementation():
    cfg = d.Config()
    wm, actor, value = d.WorldModel(cfg, 2), d.Actor(cfg, 2), d.ValueModel(cfg)
    n = d.count_parameters
    assert n(wm.encoder) == 690_144
    assert n(wm.decoder) == 3_795_555
    assert n(wm.reward) == 253_201
    # hyperparameters.md lists the RSSM as 557,920, but its own world-model total (5,296,020)
    # implies 557,120 = 6,600 + 241,200 (GRU) + 40,200 + 12,060 + 245,000 + 12,060.
    assert n(wm.rssm) == 557_120
    assert n(wm) == 5_296_020
    assert n(value) == 413_601
    assert n(actor) == 575_204


def test_shapes_through_encoder_rssm_decoder_and_imagination():
    cfg = tiny_config()
    wm, actor = d.WorldModel(cfg, 3), d.Actor(cfg, 3)
    B, L, F = 2, 5, cfg.stoch_size + cfg.deter_size
    batch = fake_batch(cfg, action_dim=3, B=B, L=L)
    obs = d.preprocess(batch["obs"])
    assert obs.min() >= -0.5 and obs.max() <= 0.5
    embed = wm.encoder(obs)
    assert embed.shape == (B, L, 32 * cfg.cnn_depth)
    s = wm.rssm.observe(embed, batch["action"])
    assert s["z"].shape == (B, L, cfg.stoch_size) and s["h"].shape == (B, L, cfg.deter_size)
    for k in ("post_mean", "post_std", "prior_mean", "prior_std"):
        assert s[k].shape == (B, L, cfg.stoch_size)
        if k.endswith("std"):
            assert (s[k] >= cfg.min_std).all()
    feat = torch.cat([s["z"], s["h"]], -1)
    assert wm.decoder(feat).shape == (B, L, 3, 64, 64)
    assert wm.reward(feat).shape == (B, L)
    feats, log_probs = d.imagine(wm, actor, s["z"].reshape(-1, cfg.stoch_size),
                                 s["h"].reshape(-1, cfg.deter_size), cfg.horizon)
    assert feats.shape == (cfg.horizon, B * L, F) and log_probs.shape == (cfg.horizon, B * L)


def test_fast_linear_equals_f_linear_in_value_and_gradients():
    """The speed path for dense layers (oneDNN on CPU) must compute F.linear exactly."""
    if d._onednn_linear is None:
        pytest.skip("this torch build has no working oneDNN linear: d.linear is F.linear")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 17, generator=g, requires_grad=True)
    w = torch.randn(9, 17, generator=g, requires_grad=True)
    b = torch.randn(9, generator=g, requires_grad=True)
    up = torch.randn(3, 40, 9, generator=g)
    results = []
    for fn in (torch.nn.functional.linear, d.linear):
        y = fn(x, w, b)
        grads = torch.autograd.grad(y, (x, w, b), up)
        results.append((y, *grads))
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    frozen_w = w.detach()                                  # no weight gradient asked for
    gx, = torch.autograd.grad(d.linear(x, frozen_w, None), (x,), up)
    torch.testing.assert_close(gx, up @ frozen_w, rtol=1e-5, atol=1e-5)


def test_decoder_equals_plain_transposed_convolutions():
    """The decoder's speed-ups (matrix product for the 1×1 layer, channels-last) change no value."""
    torch.manual_seed(0)
    dec, feat = d.Decoder(4, 40), torch.randn(2, 3, 40)
    x = dec.fc(feat).reshape(-1, dec.fc.out_features, 1, 1)
    for i, deconv in enumerate(dec.deconvs):
        x = torch.nn.functional.conv_transpose2d(x, deconv.weight.contiguous(), deconv.bias, 2)
        x = torch.relu(x) if i < 3 else x
    torch.testing.assert_close(dec(feat), x.reshape(2, 3, 3, 64, 64), rtol=1e-5, atol=1e-5)


def test_actor_is_tanh_gaussian_with_init_std_5_and_bounded_mean():
    cfg = tiny_config()
    actor = d.Actor(cfg, 2)
    torch.nn.init.zeros_(actor.net[-1].weight)
    torch.nn.init.zeros_(actor.net[-1].bias)
    mean, std = actor.dist_params(torch.randn(7, cfg.stoch_size + cfg.deter_size))
    torch.testing.assert_close(std, torch.full_like(std, 5.0 + 1e-4))
    torch.nn.init.constant_(actor.net[-1].bias, 1e3)            # huge raw mean
    mean, _ = actor.dist_params(torch.randn(7, cfg.stoch_size + cfg.deter_size))
    assert torch.allclose(mean, torch.full_like(mean, 5.0))     # 5·tanh(μ/5) → 5
    action, log_prob = actor(torch.randn(1000, cfg.stoch_size + cfg.deter_size))
    assert action.abs().max() <= 1 and torch.isfinite(log_prob).all()


def test_actor_log_prob_matches_torch_transformed_distribution():
    cfg = tiny_config()
    actor = d.Actor(cfg, 2).double()
    # Moderate means and stds (μ = 0.3, −0.4; σ ≈ 1.3), so that atanh(a), which torch's
    # TanhTransform needs, is accurate; float64 for the same reason.
    torch.nn.init.zeros_(actor.net[-1].weight)
    with torch.no_grad():
        actor.net[-1].bias.copy_(torch.tensor([0.3, -0.4, -4.0, -4.0]))
    feat = torch.randn(500, cfg.stoch_size + cfg.deter_size, dtype=torch.float64)
    action, log_prob = actor(feat)
    mean, std = actor.dist_params(feat)
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, std), [torch.distributions.TanhTransform()])
    torch.testing.assert_close(log_prob, dist.log_prob(action).sum(-1), rtol=1e-6, atol=1e-6)


# The truncated-normal actor (DreamerV2's, not in the paper): density, sampling and gradient
# against the formulas written out in float64 with math.erf.
def truncated_normal_cdf(a, mu, sigma):
    """P(A ≤ a) for A ~ N(μ, σ) truncated to [−1, 1], in float64."""
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    low, high = phi((-1 - mu) / sigma), phi((1 - mu) / sigma)
    return (phi((min(max(a, -1), 1) - mu) / sigma) - low) / (high - low)


def trunc_actor(mu, raw_std, action_dim=1):
    """A truncated-normal actor whose μ and σ are the same for every input: its last layer
    outputs x_μ = atanh(μ) and x_σ = raw_std."""
    actor = d.TruncatedNormalActor(tiny_config(actor_dist="trunc_normal"), action_dim)
    torch.nn.init.zeros_(actor.net[-1].weight)
    with torch.no_grad():
        actor.net[-1].bias.copy_(torch.tensor([math.atanh(mu)] * action_dim
                                              + [raw_std] * action_dim))
    return actor


@pytest.mark.parametrize("mu,raw_std", [(0.0, 0.0), (0.9, -3.0), (-0.97, 2.0), (0.5, -20.0)])
def test_trunc_normal_actor_samples_and_density_are_the_truncated_normal(mu, raw_std):
    actor = trunc_actor(mu, raw_std)
    sigma = 2 / (1 + math.exp(-raw_std / 2)) + 0.1               # σ = 2·sigmoid(x/2) + 0.1
    F = actor.net[0].in_features
    torch.manual_seed(0)
    with torch.no_grad():
        action, log_prob = actor(torch.randn(20000, F))
    a = action[:, 0].double().numpy()
    assert a.min() >= -1 and a.max() <= 1
    for q in (-0.9, -0.5, 0.0, 0.5, 0.9):                        # empirical vs exact CDF
        assert abs(np.mean(a <= q) - truncated_normal_cdf(q, mu, sigma)) < 0.015, q
    # ln q(a) = ln N(a; μ, σ) − ln(Φ(β) − Φ(α)), written out at each sample
    erf = lambda x: math.erf(x / sigma / math.sqrt(2))
    mass = 0.5 * (erf(1 - mu) - erf(-1 - mu))                    # Φ(β) − Φ(α)
    expected = [-0.5 * ((x - mu) / sigma) ** 2 - math.log(sigma * math.sqrt(2 * math.pi) * mass)
                for x in a[:200]]
    np.testing.assert_allclose(log_prob[:200].double().numpy(), expected, rtol=1e-4, atol=1e-4)
    mode, _ = actor(torch.randn(3, F), sample=False)
    torch.testing.assert_close(mode, torch.full_like(mode, mu))


def test_trunc_normal_actor_density_integrates_to_one_and_gradients_are_reparameterised():
    actor = trunc_actor(0.6, -1.0)
    mean, std = (t.detach() for t in actor.dist_params(torch.zeros(1, actor.net[0].in_features)))
    # ∫ q(a) da over [−1, 1] = 1 (trapezoid rule on the actor's own log-density)
    grid = torch.linspace(-1, 1, 20001, dtype=torch.float64)
    density = actor.log_prob(grid, mean[0, 0].double(), std[0, 0].double()).exp()
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-6)
    # ∂E[a]/∂x_μ from the samples (reparameterised) against the derivative of the exact mean
    # E[a] = μ + σ·(φ(α) − φ(β)) / (Φ(β) − Φ(α)), μ = tanh(x_μ), by central differences.
    def exact_mean(x_mu, sigma=float(std[0, 0])):
        mu = math.tanh(x_mu)
        pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
        alpha, beta = (-1 - mu) / sigma, (1 - mu) / sigma
        z = 0.5 * (math.erf(beta / math.sqrt(2)) - math.erf(alpha / math.sqrt(2)))
        return mu + sigma * (pdf(alpha) - pdf(beta)) / z
    torch.manual_seed(1)
    action, _ = actor(torch.zeros(200000, actor.net[0].in_features))
    action.mean().backward()
    got = actor.net[-1].bias.grad[0].item()
    x_mu, h = math.atanh(0.6), 1e-5
    expected = (exact_mean(x_mu + h) - exact_mean(x_mu - h)) / (2 * h)
    assert got == pytest.approx(expected, rel=0.02)
    assert actor.net[-1].bias.grad[1].item() != 0                # σ moves the mean too


@pytest.mark.parametrize("x_mu,x_sigma", [(100.0, 30.0), (-100.0, -30.0), (20.0, -30.0)])
def test_trunc_normal_actor_stays_finite_at_extreme_outputs(x_mu, x_sigma):
    actor = d.TruncatedNormalActor(tiny_config(actor_dist="trunc_normal"), 2)
    torch.nn.init.zeros_(actor.net[-1].weight)
    with torch.no_grad():
        actor.net[-1].bias.copy_(torch.tensor([x_mu, x_mu, x_sigma, x_sigma]))
    torch.manual_seed(0)
    action, log_prob = actor(torch.randn(4000, actor.net[0].in_features))
    assert action.abs().max() <= 1 and torch.isfinite(log_prob).all()
    log_prob.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in actor.parameters())


def test_trunc_normal_actor_acts_and_trains_in_the_agent():
    """The variant end to end inside the agent: exploring actions in [−1, 1], one update of all
    three parts with finite losses that changes the actor, and its mode for evaluation."""
    cfg = tiny_config(actor_dist="trunc_normal", actor_entropy=1e-4)
    torch.manual_seed(0)
    agent = d.Dreamer(cfg, 2)
    obs = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    state = None
    for _ in range(5):
        action, state = agent.act(obs, state, explore=True)
        assert action.shape == (2,) and np.abs(action).max() <= 1
    before = snapshot(agent.actor)
    metrics = agent.train_step(fake_batch(cfg))
    assert all(torch.isfinite(v) for v in metrics.values())
    assert 0 <= metrics["actor/saturation"] <= 1
    assert not identical(before, snapshot(agent.actor))
    mode, _ = agent.act(obs, None, explore=False)
    assert np.abs(mode).max() < 1


def test_actor_dist_default_is_the_paper_and_the_variant_has_its_parameter_count():
    cfg = d.Config()
    assert cfg.actor_dist == "tanh_normal"
    assert type(d.Dreamer(tiny_config(), 2).actor) is d.Actor
    variant = d.Dreamer(tiny_config(actor_dist="trunc_normal"), 2).actor
    assert type(variant) is d.TruncatedNormalActor
    assert d.count_parameters(variant) == d.count_parameters(d.Actor(tiny_config(), 2))
    for overrides, message in [({"actor_dist": "beta"}, "--actor_dist must be one of"),
                               ({"actor_dist": "trunc_normal", "actor_min_std": 0.2},
                                "shapes the tanh_normal actor only")]:
        with pytest.raises(d.UserError, match=message):
            d.validate(d.Config(**overrides))


# ---------------------------------------------------------------------------------------------
# World-model loss (Eq. 10)
# ---------------------------------------------------------------------------------------------

def test_kl_gaussian_matches_torch():
    g = torch.Generator().manual_seed(0)
    mq, mp = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    sq, sp = torch.rand(5, 4, generator=g) + 0.1, torch.rand(5, 4, generator=g) + 0.1
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mq, sq),
                                            torch.distributions.Normal(mp, sp))
    torch.testing.assert_close(d.kl_gaussian(mq, sq, mp, sp), ref)


def perfect_heads(wm, batch):
    """Decoder and reward head that predict the batch exactly: J_O = J_R = 0, so the loss of
    Eq. 10 is its KL term alone (no float32 cancellation against a large image loss)."""
    wm.decoder.forward = lambda feat: d.preprocess(batch["obs"])
    wm.reward.forward = lambda feat: batch["reward"]


def test_world_model_loss_kl_term_equals_free_nats_when_posterior_equals_prior():
    torch.manual_seed(0)
    cfg = tiny_config()
    wm = d.WorldModel(cfg, 2)
    rssm, batch = wm.rssm, fake_batch(cfg)
    # Make the posterior the prior: same mean and std as the transition model gives for h_t.
    rssm.posterior = lambda h, embed: rssm._gaussian(rssm.img_out(torch.nn.functional.elu(
        rssm.img_hidden(h))))
    perfect_heads(wm, batch)
    loss, metrics, _, _ = d.world_model_loss(wm, batch, cfg)
    assert metrics["model/kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(cfg.free_nats, rel=1e-5)


@pytest.mark.parametrize("scale", [0.3, 3.0])     # mean KL below, then above the free nats
def test_world_model_loss_kl_term_is_scaled_max_of_mean_kl_and_free_nats(scale):
    cfg = tiny_config(kl_scale=2.0)
    wm = d.WorldModel(cfg, 2)
    B, L, Z = 3, 6, cfg.stoch_size
    g = torch.Generator().manual_seed(0)
    stats = {"post_mean": scale * torch.randn(B, L, Z, generator=g),
             "post_std": torch.rand(B, L, Z, generator=g) + 0.2,
             "prior_mean": torch.zeros(B, L, Z), "prior_std": torch.ones(B, L, Z)}
    stats["post_mean"][0] *= 4            # per-step KLs on both sides of the free nats
    observe, batch = wm.rssm.observe, fake_batch(cfg, B=B, L=L)
    wm.rssm.observe = lambda embed, action: {**observe(embed, action), **stats}
    perfect_heads(wm, batch)
    loss, metrics, _, _ = d.world_model_loss(wm, batch, cfg)
    ref = torch.distributions.kl_divergence(    # KL(posterior ‖ prior), Σ over z, mean over B, L
        torch.distributions.Normal(stats["post_mean"], stats["post_std"]),
        torch.distributions.Normal(stats["prior_mean"], stats["prior_std"])).sum(-1).mean()
    assert metrics["model/kl"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert loss.item() == pytest.approx(2.0 * max(ref.item(), cfg.free_nats), rel=1e-5)


def test_rssm_stds_have_their_floor():
    cfg = tiny_config()
    rssm = d.WorldModel(cfg, 2).rssm
    for layer in (rssm.img_out, rssm.obs_out):
        torch.nn.init.constant_(layer.bias, -100.0)
    s = rssm.observe(torch.randn(2, 4, 32 * cfg.cnn_depth), torch.zeros(2, 4, 2))
    for k in ("post_std", "prior_std"):
        torch.testing.assert_close(s[k], torch.full_like(s[k], cfg.min_std))


def gru_step(cell, x, h):
    """torch.nn.GRUCell written out (the gates of Keras' GRUCell with reset_after=True):
    r, u = σ(W_i x + b_i + W_h h + b_h) for the reset and update gates,
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)),  h' = (1 − u) ⊙ n + u ⊙ h."""
    gi = x @ cell.weight_ih.t() + cell.bias_ih
    gh = h @ cell.weight_hh.t() + cell.bias_hh
    (ir, iu, i_n), (hr, hu, hn) = gi.chunk(3, -1), gh.chunk(3, -1)
    r, u = torch.sigmoid(ir + hr), torch.sigmoid(iu + hu)
    return (1 - u) * torch.tanh(i_n + r * hn) + u * h


def dense(layer, x):
    return x @ layer.weight.t() + layer.bias


def test_rssm_prior_is_the_eq1_transition_step():
    """q(s_t | s_{t−1}, a_{t−1}): h_t = GRU(h_{t−1}, ELU(W·[z_{t−1}, a_{t−1}] + b)), then
    μ, σ = split(W₂·ELU(W₁·h_t + b₁) + b₂), σ = softplus(·) + min_std, written out by hand."""
    cfg = tiny_config()
    rssm = d.WorldModel(cfg, 2).rssm
    g = torch.Generator().manual_seed(0)
    z, h = torch.randn(4, cfg.stoch_size, generator=g), torch.randn(4, cfg.deter_size, generator=g)
    a = torch.rand(4, 2, generator=g) * 2 - 1
    with torch.no_grad():
        h_t, mean, std = rssm.prior(z, h, a)
        x = torch.nn.functional.elu(dense(rssm.img_in, torch.cat([z, a], 1)))
        h_ref = gru_step(rssm.gru, x, h)
        out = dense(rssm.img_out, torch.nn.functional.elu(dense(rssm.img_hidden, h_ref)))
    torch.testing.assert_close(h_t, h_ref)
    torch.testing.assert_close(mean, out[:, :cfg.stoch_size])
    torch.testing.assert_close(std, torch.log1p(torch.exp(out[:, cfg.stoch_size:])) + cfg.min_std)
    inputs = [x.clone().requires_grad_() for x in (z, h, a)]   # gradients reach every input
    h_t, mean, std = rssm.prior(*inputs)
    grads = torch.autograd.grad((h_t.sum() + mean.sum() + std.sum()), inputs)
    assert all(g.abs().sum() > 0 for g in grads)


def test_rssm_posterior_is_the_eq1_representation_step():
    """p(s_t | s_{t−1}, a_{t−1}, o_t) given h_t and e_t: μ, σ = split(W₂·ELU(W₁·[h_t, e_t] + b₁)
    + b₂), σ = softplus(·) + min_std, written out by hand."""
    cfg = tiny_config()
    rssm = d.WorldModel(cfg, 2).rssm
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, cfg.deter_size, generator=g)
    e = torch.randn(4, 32 * cfg.cnn_depth, generator=g)
    with torch.no_grad():
        mean, std = rssm.posterior(h, e)
        hidden = torch.nn.functional.elu(dense(rssm.obs_hidden, torch.cat([h, e], 1)))
        out = dense(rssm.obs_out, hidden)
    torch.testing.assert_close(mean, out[:, :cfg.stoch_size])
    torch.testing.assert_close(std, torch.log1p(torch.exp(out[:, cfg.stoch_size:])) + cfg.min_std)
    inputs = [x.clone().requires_grad_() for x in (h, e)]      # gradients reach every input
    mean, std = rssm.posterior(*inputs)
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(mean.sum() + std.sum(), inputs))


def test_observe_uses_action_of_its_row_and_image_of_its_step():
    """Row t holds a_{t−1}: h_t depends on action[t] (and earlier), never on action[t+1];
    z_t is the posterior: it depends on the embedding of o_t, never on later ones."""
    cfg = tiny_config()
    rssm = d.WorldModel(cfg, 2).rssm
    embed = torch.randn(2, 5, 32 * cfg.cnn_depth, requires_grad=True)
    action = torch.randn(2, 5, 2, requires_grad=True)
    s = rssm.observe(embed, action)
    t = 2
    ga, = torch.autograd.grad(s["h"][:, t].sum(), action, retain_graph=True)
    assert ga[:, t].abs().sum() > 0 and ga[:, t + 1:].abs().sum() == 0
    ge, = torch.autograd.grad(s["z"][:, t].sum(), embed, retain_graph=True)
    assert ge[:, t].abs().sum() > 0 and ge[:, t + 1:].abs().sum() == 0
    gh, = torch.autograd.grad(s["h"][:, t].sum(), embed)
    assert gh[:, t].abs().sum() == 0          # h_t is the prior's: computed before seeing o_t


def test_world_model_loss_image_and_reward_log_likelihoods():
    """J_O is summed over the 3·64·64 pixels (not averaged), J_R is per step; both unit-variance
    Gaussians (constants dropped). Checked with a decoder and reward head that predict zero."""
    cfg = tiny_config()
    wm = d.WorldModel(cfg, 2)
    batch = fake_batch(cfg)
    B, L = batch["reward"].shape
    wm.decoder.forward = lambda feat: torch.zeros(*feat.shape[:-1], 3, 64, 64)
    wm.reward.forward = lambda feat: torch.zeros(feat.shape[:-1])
    _, metrics, _, _ = d.world_model_loss(wm, batch, cfg)
    x = batch["obs"].double() / 255 - 0.5
    normal = torch.distributions.Normal(torch.zeros_like(x), 1.0)
    expected = -(normal.log_prob(x) + 0.5 * math.log(2 * math.pi)).sum((2, 3, 4)).mean()
    assert metrics["model/image_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["model/reward_loss"].item() == pytest.approx(
        (0.5 * batch["reward"] ** 2).mean().item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Discrete actions and early episode ends (appendix "Atari and DeepMind Lab")
# ---------------------------------------------------------------------------------------------

def atari_config(**overrides):
    return tiny_config(**{**d.PRESETS["atari"], "horizon": 5, **overrides})


def test_onehot_actor_samples_one_hot_forward_and_passes_gradients_straight_through():
    """Forward: exactly one-hot, distributed as softmax(logits); backward: the gradient of the
    probabilities (a = onehot + p − sg(p)); evaluation: the most likely action."""
    actor = d.OneHotActor(atari_config(), 4)
    torch.manual_seed(0)
    feat = torch.randn(5, actor.net[0].in_features)
    logits = actor.net(feat)
    action, log_prob = actor(feat)
    assert set(action.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(action.detach().sum(-1), torch.ones(5))
    torch.testing.assert_close(log_prob, torch.log_softmax(logits, -1)[action.detach().bool()])
    w = torch.randn(4)
    params = list(actor.parameters())
    got = torch.autograd.grad((action * w).sum(), params)
    expected = torch.autograd.grad((torch.softmax(actor.net(feat), -1) * w).sum(), params)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    mode, _ = actor(feat, sample=False)
    assert torch.equal(mode.argmax(-1), logits.argmax(-1))
    torch.manual_seed(1)                              # the samples follow softmax(logits)
    probs = torch.softmax(logits[:1], -1).detach()
    counts = sum(actor(feat[:1].expand(2000, -1))[0].detach() for _ in range(5))
    torch.testing.assert_close(counts.sum(0) / 10000, probs[0], atol=0.02, rtol=0)


def test_onehot_actor_learns_from_eq7_through_the_imagined_dynamics():
    """The actor's logits get a finite, non-zero gradient from Eq. 7 (through the straight-
    through sample and the imagined transitions; the actor sees detached states)."""
    cfg = atari_config(discount_scale=0.0)
    torch.manual_seed(0)
    agent = d.Dreamer(cfg, 3)
    z, h = torch.randn(2, 4, cfg.stoch_size), torch.randn(2, 4, cfg.deter_size)
    loss, *_ = d.actor_loss(agent.world_model, agent.actor, agent.value, z, h, cfg)
    grads = torch.autograd.grad(loss, list(agent.actor.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert max(g.abs().max() for g in grads) > 1e-6


def test_epsilon_greedy_follows_the_papers_schedule_and_picks_uniformly():
    """ε: 0.4 → 0.1 linearly over 200k updates, then 0.1. With probability ε an action is
    replaced by one drawn uniformly from all A (so it changes with probability ε·(A−1)/A)."""
    cfg = atari_config()
    assert [d.epsilon(cfg, u) for u in (0, 100_000, 200_000, 10 ** 7)] == \
        pytest.approx([0.4, 0.25, 0.1, 0.1])
    A, N = 6, 60_000
    greedy = torch.nn.functional.one_hot(torch.zeros(N, dtype=torch.long), A).float()
    torch.manual_seed(0)
    for updates, eps in ((0, 0.4), (200_000, 0.1)):
        explored = d.OneHotActor.explore(greedy, cfg, updates)
        assert torch.equal(explored.sum(-1), torch.ones(N))
        changed = (explored.argmax(-1) != 0).float().mean().item()
        assert abs(changed - eps * (A - 1) / A) < 0.01
        others = torch.bincount(explored.argmax(-1), minlength=A)[1:].float()
        assert (others / others.mean() - 1).abs().max() < 0.1       # uniform among them too
    zero = dataclasses.replace(cfg, epsilon_start=0.0, epsilon_end=0.0)
    assert torch.equal(d.OneHotActor.explore(greedy, zero, 0), greedy)


def test_discount_predictor_learns_soft_labels_gamma_times_not_terminal():
    """J_γ: a Bernoulli log-likelihood of the labels γ·(1 − terminal_t), weighted by
    discount_scale in Eq. 10; a terminal row's label is 0, every other row's γ."""
    cfg = atari_config()
    torch.manual_seed(0)
    wm = d.WorldModel(cfg, 3)
    batch = fake_batch(cfg, action_dim=3)
    batch["terminal"] = torch.zeros(3, 6, dtype=torch.bool)
    batch["terminal"][1, 5] = True
    torch.manual_seed(1)
    loss, metrics, z, h = d.world_model_loss(wm, batch, cfg)
    logit = wm.discount(torch.cat([z, h], -1))
    label = torch.full((3, 6), cfg.discount)
    label[1, 5] = 0.0
    p = torch.sigmoid(logit)
    expected = -(label * torch.log(p) + (1 - label) * torch.log(1 - p)).mean()
    torch.testing.assert_close(metrics["model/discount_loss"], expected)
    without = dataclasses.replace(cfg, discount_scale=0.0)
    torch.manual_seed(1)
    loss0, _, _, _ = d.world_model_loss(wm, batch, without)   # same modules, term left out
    torch.testing.assert_close(loss - loss0, cfg.discount_scale * expected)
    assert d.WorldModel(tiny_config(), 2).discount is None       # none on DMC


def test_predicted_discounts_replace_gamma_in_returns_and_weights_and_end_the_count(agent_and_start):
    """With a discount predictor, d_τ = sigmoid(logit(s_τ)) replaces γ in Eq. 6 and in the
    weights (their cumulative product from 1); after a predicted end (d ≈ 0) nothing counts."""
    _, z, h = agent_and_start
    cfg = atari_config(horizon=6)
    torch.manual_seed(0)
    agent = d.Dreamer(cfg, 3)
    wm = agent.world_model
    torch.manual_seed(4)
    _, feats, returns, weights, _ = d.actor_loss(wm, agent.actor, agent.value, z, h, cfg)
    r, v, disc = wm.reward(feats), agent.value(feats), torch.sigmoid(wm.discount(feats))
    H = cfg.horizon
    # Eq. 6 with per-step discounts, written out: R_τ = r_τ + d_τ((1−λ)v_{τ+1} + λR_{τ+1})
    R, out = v[-1], []
    for t in reversed(range(H - 1)):
        R = r[t] + disc[t] * ((1 - cfg.lam) * v[t + 1] + cfg.lam * R)
        out.append(R)
    torch.testing.assert_close(returns, torch.stack(out[::-1]))
    w = torch.cumprod(torch.cat([torch.ones_like(disc[:1]), disc[:-2]]), 0)
    torch.testing.assert_close(weights, w)
    with torch.no_grad():                                # predict an end after every state
        wm.discount.net[-1].weight.zero_()
        wm.discount.net[-1].bias.fill_(-30.0)
    torch.manual_seed(4)
    _, feats, returns, weights, _ = d.actor_loss(wm, agent.actor, agent.value, z, h, cfg)
    torch.testing.assert_close(returns, wm.reward(feats)[:-1], atol=1e-6, rtol=0)
    assert torch.equal(weights[0], torch.ones_like(weights[0])) and weights[1:].max() < 1e-12


def test_atari_lost_life_is_terminal_for_training_and_a_time_out_is_not():
    """Breakout (5 lives), random actions: a training episode ends at the first lost life, with
    the last row terminal; an evaluation episode goes on past it; the time limit ends an episode
    without a terminal."""
    np.random.seed(0)
    train = d.make_env("atari_breakout", 4, 108_000, seed=0)
    episode, _ = d.run_episode(train, lambda obs, state: (train.sample_action(), None))
    assert episode["terminal"][-1] and not episode["terminal"][:-1].any()
    assert train.ale.lives() == 4 and not train.ale.game_over()
    assert episode["obs"].shape[1:] == (3, 64, 64) and episode["action"].shape[1] == 4
    evaluate = d.make_env("atari_breakout", 4, 108_000, seed=0, training=False)
    evaluate.reset()
    for _ in range(2000):                                # until the first life is lost
        _, _, done, terminal = evaluate.step(evaluate.sample_action())
        if evaluate.ale.lives() < 5:
            break
    assert evaluate.ale.lives() == 4 and not done and not terminal     # evaluation goes on
    short = d.make_env("atari_breakout", 4, 40, seed=0)
    episode, _ = d.run_episode(short, lambda obs, state: (np.eye(4)[0], None))   # NOOPs
    assert len(episode["reward"]) == 11 and not episode["terminal"].any()


class ScriptedALE:
    """Stands in for ale-py's ALEInterface: the lives after each frame come from a script."""

    def __init__(self, lives):
        self.script, self.frame = lives, 0

    def act(self, action):
        self.frame += 1
        return 0.0

    def lives(self):
        return self.script[min(self.frame, len(self.script) - 1)]

    def game_over(self):
        return False

    def getScreenRGB(self, out):
        out[:] = self.frame


def test_atari_a_life_lost_after_a_bonus_life_ends_the_episode_inside_the_repeat():
    """[official code] The lives are remembered after every frame: 3 lives, a bonus life at
    frame 2 (4), one lost at frame 6 (3 again) is a lost life, terminal at once, and the step
    stops after the 6 frames really played (env.steps counts them, not 2 × R = 8)."""
    env = d.make_env("atari_breakout", 4, 108_000, seed=0)
    env.reset()
    env.ale, env.lives, env.steps = ScriptedALE([3, 3, 4, 4, 4, 4, 3, 3, 3]), 3, 0
    _, _, done, terminal = env.step(np.eye(4)[0])                   # frames 1–4: 3, 4, 4, 4
    assert not done and not terminal and env.lives == 4
    _, _, done, terminal = env.step(np.eye(4)[0])                   # frames 5, 6: 4, 3
    assert done and terminal and env.steps == 6


def test_atari_a_life_lost_before_min_length_does_not_end_a_training_episode():
    """[paper's TF1 code: MinimumDuration] With min_length 3 (the Trainer passes batch_length),
    a life lost in the first agent step goes on into the next life, not terminal; one lost from
    agent step 3 on ends the episode. Short lives thus stay inside chunks that can be sampled."""
    env = d.make_env("atari_breakout", 4, 108_000, seed=0, min_length=3)
    env.reset()
    env.ale = ScriptedALE([5, 5, 4] + [4] * 8 + [3] * 4)   # lives lost at frames 2 and 11
    env.lives, env.steps = 5, 0
    results = [env.step(np.eye(4)[0]) for _ in range(3)]      # frames 1–12
    assert [r[3] for r in results] == [False, False, True] and env.steps == 11
    assert d.make_env("atari_breakout", 4, 108_000, seed=0, training=False).min_length == 0


def test_replay_of_tasks_that_end_early_brings_terminal_rows_at_their_stored_rate():
    """[DreamerV2's pre-release code: oversample_ends] Uniform starts put an episode's terminal
    last row into batches about L times less often than it is stored; EndsReplayBuffer moves
    starts past the last whole window back to it, so it comes at about the stored rate, while
    an episode cut by a time limit is sampled uniformly, exactly as by ReplayBuffer."""
    def episode(rows, ends):
        return {"obs": np.zeros((rows, 1), np.float32), "action": np.zeros((rows, 1), np.float32),
                "reward": np.arange(rows, dtype=np.float32),
                "terminal": np.arange(rows) == rows - 1 if ends else np.zeros(rows, bool)}
    rates = {}
    for kind in (d.ReplayBuffer, d.EndsReplayBuffer):
        replay = kind(seed=0)
        for rows in (60, 80, 200):
            replay.add(episode(rows, ends=True))
        batch = replay.sample(20_000, 50)
        rates[kind] = batch["terminal"].mean()
    stored = np.mean([1 / 60, 1 / 80, 1 / 200])           # per episode, episodes drawn uniformly
    assert rates[d.ReplayBuffer] < stored / 10             # the problem: ≈ 0.09 % against 1.1 %
    assert rates[d.EndsReplayBuffer] == pytest.approx(stored, rel=0.1)
    plain, ends = d.ReplayBuffer(seed=1), d.EndsReplayBuffer(seed=1)
    for replay in (plain, ends):
        replay.add(episode(120, ends=False))
    assert np.array_equal(plain.sample(64, 50)["reward"], ends.sample(64, 50)["reward"])
    assert ends.sampleable(50) == 1.0 and ends.sampleable(121) == 0.0


def test_evaluation_of_discrete_actions_is_epsilon_greedy_with_a_tiny_epsilon(monkeypatch):
    """[paper's TF1 code: test_action_noise 0.001] Evaluation plays the mode but, with
    probability epsilon_eval, a uniform action, so that a game never stalls on one action; the
    continuous actors' evaluation action is the mode itself (DMC unchanged)."""
    cfg, _ = d.parse_args(["--env", "atari_pong", "--preset", "tiny"])
    assert cfg.epsilon_eval == 0.001
    mode = torch.nn.functional.one_hot(torch.zeros(60_000, dtype=torch.long), 6).float()
    torch.manual_seed(0)
    for eps in (0.001, 0.5):
        played = d.OneHotActor.evaluation(mode, dataclasses.replace(cfg, epsilon_eval=eps))
        assert played.sum(-1).eq(1).all()                           # one-hot rows
        other = (played.argmax(-1) != 0).float().mean().item()      # replaced, not by action 0
        assert other == pytest.approx(eps * 5 / 6, abs=4 * math.sqrt(eps / 60_000) + 1e-4)
    continuous = torch.rand(5, 2) * 2 - 1
    assert d.Actor.evaluation(continuous, cfg) is continuous
    agent = d.Dreamer(cfg, 6, "cpu")
    called = []
    monkeypatch.setattr(d.OneHotActor, "evaluation",
                        staticmethod(lambda action, cfg: called.append(action) or action))
    agent.act(np.zeros((3, 64, 64), np.uint8), None, explore=False)
    assert len(called) == 1
    agent.act(np.zeros((3, 64, 64), np.uint8), None, explore=True)
    assert len(called) == 1                                         # training explores instead


def test_a_long_evaluation_says_how_far_it_got(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(d, "EVAL_PROGRESS", 100)
    cfg, _ = d.parse_args([*E2E, "--eval_episodes", "2"])
    trainer = d.Trainer(cfg, "reacher_easy", tmp_path / "run", "cpu")
    try:
        trainer.evaluate()
    finally:
        trainer.lock.close()
    out = capsys.readouterr().out
    assert out.count("env steps so far") == 2                       # 200-step episodes
    assert "evaluation 1/2: 100 env steps so far" in out and "evaluation 2/2: 100" in out


def test_atari_training_loop_wiring(tmp_path, monkeypatch):
    """The Trainer's parts for Atari: a lost life ends training episodes but not evaluation
    ones; exploration gets the run's update count (the ε schedule); seeding goes on until an
    episode is long enough for a chunk; the world model learns tanh(r); imagination starts from
    all but each chunk's last state; the one-hot actor has no stuck-actor watch."""
    cfg, _ = d.parse_args(["--env", "atari_breakout", "--preset", "tiny"])
    trainer = d.Trainer(cfg, "atari_breakout", tmp_path / "run", "cpu")
    try:
        assert trainer.env.life_done and not trainer.eval_env.life_done
        seen = []
        monkeypatch.setattr(trainer.agent, "act", lambda obs, state, explore, updates=0:
                            (seen.append(updates), (trainer.env.sample_action(), None))[1])
        trainer.counters["updates"] = 123
        trainer.collect(trainer.env, explore=True)
        assert seen and set(seen) == {123}
        short = {"obs": np.zeros((5, 3, 64, 64), np.uint8), "action": np.zeros((5, 4), np.float32),
                 "reward": np.zeros(5, np.float32), "terminal": np.zeros(5, bool)}
        for _ in range(cfg.seed_episodes):
            trainer.replay.append(short, None)
        assert trainer.seeding()                      # no episode of batch_length rows yet
        trainer.replay.append({k: np.concatenate([v] * 4) for k, v in short.items()}, None)
        assert not trainer.seeding()
    finally:
        trainer.lock.close()
    agent = trainer.agent
    batch = {k: torch.as_tensor(v) for k, v in fake_batch(cfg, action_dim=4).items()}
    batch["reward"] = batch["reward"] * 5
    batch["terminal"] = torch.zeros(3, 6, dtype=torch.bool)
    torch.manual_seed(2)
    _, _, metrics = agent.update_world_model(batch, step=False)
    torch.manual_seed(2)
    _, expected, _, _ = d.world_model_loss(agent.world_model,
                                           {**batch, "reward": torch.tanh(batch["reward"])}, cfg)
    torch.testing.assert_close(metrics["model/reward_loss"], expected["model/reward_loss"])
    z, h = torch.randn(3, 6, cfg.stoch_size), torch.randn(3, 6, cfg.deter_size)
    feats, _, _, metrics = agent.update_actor(z, h)
    assert feats.shape[:2] == (cfg.horizon, 3 * 5)    # B·(L − 1) starts
    assert "actor/saturation" not in metrics


def test_atari_preset_is_the_papers_discrete_settings_and_the_base_for_atari_tasks():
    cfg, _ = d.parse_args(["--env", "atari_pong", "--preset", "atari"])
    assert (cfg.horizon, cfg.kl_scale, cfg.reward_transform, cfg.actor_dist) == \
        (10, 0.1, "tanh", "onehot")
    assert (cfg.discount_scale, cfg.action_repeat, cfg.time_limit) == (10.0, 4, 108_000)
    assert (cfg.epsilon_start, cfg.epsilon_end, cfg.epsilon_updates) == (0.4, 0.1, 200_000)
    assert d.parse_args(["--env", "atari_pong"])[0] == cfg
    tiny, _ = d.parse_args(["--env", "atari_pong", "--preset", "tiny"])
    assert tiny.deter_size == 32 and tiny.horizon == 5 and tiny.discount_scale == 10.0
    assert d.Config().discount_scale == 0 and d.Config().reward_transform == "none"


def test_atari_tiny_run_trains_evaluates_and_resumes(tmp_path):
    """A real ALE game end to end: Breakout, where a lost life ends a training episode."""
    logdir = tmp_path / "run"
    args = ["--env", "atari_breakout", "--preset", "tiny", "--time_limit", "800",
            "--train_every", "400", "--eval_every", "800", "--checkpoint_every", "800",
            "--steps", "1200", "--seed", "1", "--device", "cpu", "--logdir", str(logdir)]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    metrics = read_metrics(logdir)
    assert any("model/discount_loss" in m for m in metrics)
    assert any("eval/return" in m for m in metrics)
    files = sorted((logdir / "episodes").glob("*.npz"))
    terminal = [np.load(f)["terminal"] for f in files]
    assert all(not t[:-1].any() for t in terminal) and any(t[-1] for t in terminal)
    assert (logdir / "checkpoint.pt").exists()
    again = run_cli(*args[:-4], "--steps", "1800", "--seed", "1", "--logdir", str(logdir))
    assert again.returncode == 0 and "resuming from" in again.stdout, again.stderr[-2000:]
    assert read_metrics(logdir)[:len(metrics)] == metrics


# ---------------------------------------------------------------------------------------------
# The other representation objectives (Sec. 4): contrastive estimation, reward prediction alone
# ---------------------------------------------------------------------------------------------

def test_contrastive_log_likelihood_is_the_papers_batch_infonce():
    """J_NCE = ln q(s_t | o_t) − ln Σ_{o′} q(s_t | o′), the sum over the batch's observations for
    each state (the paper's direction), against torch's Normal densities written as an explicit
    [N, N] table in float64; −ln N exactly when the images tell nothing; → 0 when each state is
    told apart by its own image; and not the other direction (over states for one image)."""
    g = torch.Generator().manual_seed(0)
    N, F = 40, 7
    s = torch.randn(N, F, generator=g, dtype=torch.float64) * 3 + 5
    mean = s + 0.3 * torch.randn(N, F, generator=g, dtype=torch.float64)
    std = 0.01 + torch.rand(N, F, generator=g, dtype=torch.float64) * (1 + torch.arange(F))
    table = torch.distributions.Normal(mean[None], std[None]).log_prob(s[:, None]).sum(-1)
    expected = (table.diagonal() - torch.logsumexp(table, 1)).mean()   # [state i, image j]
    other_way = (table.diagonal() - torch.logsumexp(table, 0)).mean()
    got = d.contrastive_log_likelihood(s.float().reshape(4, 10, F), mean.float().reshape(4, 10, F),
                                       std.float().reshape(4, 10, F))
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    assert abs(float(other_way - expected)) > 0.1
    same = d.contrastive_log_likelihood(s.float(), torch.zeros(N, F), torch.ones(N, F))
    torch.testing.assert_close(same, torch.tensor(-math.log(N)))
    sharp = d.contrastive_log_likelihood(s.float(), s.float(), torch.full((N, F), 0.01))
    assert -1e-4 < float(sharp) <= 0


def explicit_world_model_terms(wm, batch, cfg):
    """Eq. 10's reward and KL terms, and the states, recomputed outside world_model_loss."""
    embed = wm.encoder(d.preprocess(batch["obs"]))
    s = wm.rssm.observe(embed, batch["action"])
    feat = torch.cat([s["z"], s["h"]], -1)
    reward_ll = (-0.5 * (wm.reward(feat) - batch["reward"]) ** 2).mean()
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(s["post_mean"], s["post_std"]),
                                           torch.distributions.Normal(s["prior_mean"], s["prior_std"]))
    kl_term = cfg.kl_scale * torch.clamp(kl.sum(-1).mean(), min=cfg.free_nats)
    return embed, feat, reward_ll, kl_term


@pytest.mark.parametrize("representation", ["contrastive", "reward"])
def test_other_representations_replace_the_image_term_and_keep_reward_and_kl(representation):
    """--representation contrastive: −J_NCE + β·max(KL, free nats) − J_R, with a state model in
    the decoder's place; reward: the reward and KL terms alone, and no decoder parameters at all.
    The gradient of the objective reaches the encoder and the RSSM (and the state model), never
    the actor or the value model."""
    cfg = tiny_config(representation=representation, free_nats=0.0, kl_scale=0.7)
    torch.manual_seed(0)
    agent = d.Dreamer(cfg, 2)
    wm = agent.world_model
    assert wm.decoder is None and not any("decoder" in k for k in wm.state_dict())
    assert (wm.state_model is not None) == (representation == "contrastive")
    batch = fake_batch(cfg)
    torch.manual_seed(1)
    loss, metrics, _, _ = d.world_model_loss(wm, batch, cfg)
    torch.manual_seed(1)
    embed, feat, reward_ll, kl_term = explicit_world_model_terms(wm, batch, cfg)
    expected = kl_term - reward_ll
    if representation == "contrastive":
        mean, std = wm.state_model(embed)
        nce = d.contrastive_log_likelihood(feat, mean, std)
        expected = expected - nce
        torch.testing.assert_close(metrics["model/contrastive_loss"], -nce)
    assert "model/image_loss" not in metrics
    torch.testing.assert_close(loss, expected)
    loss.backward()
    for part in ([wm.encoder, wm.rssm, wm.state_model] if representation == "contrastive"
                 else [wm.rssm]):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert all(p.grad is None for p in [*agent.actor.parameters(), *agent.value.parameters()])


def test_contrastive_objective_trains_the_encoder_through_the_state_model():
    """Without its J_NCE term a contrastive world model's encoder gets its gradient only through
    the posterior; the term adds its own: the encoder's gradient changes when it is dropped."""
    cfg = tiny_config(representation="contrastive")
    torch.manual_seed(0)
    wm = d.WorldModel(cfg, 2)
    batch = fake_batch(cfg)

    def encoder_grad(scale):
        wm.zero_grad()
        torch.manual_seed(1)
        embed = wm.encoder(d.preprocess(batch["obs"]))
        s = wm.rssm.observe(embed, batch["action"])
        feat = torch.cat([s["z"], s["h"]], -1)
        nce = d.contrastive_log_likelihood(feat, *wm.state_model(embed))
        (-scale * nce - wm.reward(feat).mean()).backward()
        return torch.cat([p.grad.flatten() for p in wm.encoder.parameters()])

    assert (encoder_grad(1.0) - encoder_grad(0.0)).abs().max() > 1e-6


def test_the_default_representation_and_value_estimate_are_the_papers():
    cfg = d.Config()
    assert (cfg.representation, cfg.value_estimate, cfg.nstep_k) == ("reconstruction", "lambda", 0)
    wm = d.WorldModel(tiny_config(), 2)
    assert wm.decoder is not None and wm.state_model is None
    for overrides, message in [({"representation": "pixels"}, "--representation must be one of"),
                               ({"value_estimate": "td"}, "--value_estimate must be lambda, nstep"),
                               ({"nstep_k": 3}, "--nstep_k is k of --value_estimate nstep"),
                               ({"value_estimate": "nstep", "nstep_k": -1}, "--nstep_k must be")]:
        with pytest.raises(d.UserError, match=message):
            d.validate(d.Config(**overrides))


def test_no_decoder_means_no_pictures_in_one_clear_line(tmp_path, capsys):
    """open_loop and prediction_error refuse a world model without a decoder, and plot.py says
    why in one line before it plays any episode."""
    cfg = tiny_config(representation="contrastive")
    torch.manual_seed(0)
    agent = d.Dreamer(cfg, 1)
    episode = {"obs": np.zeros((60, 3, 64, 64), np.uint8), "action": np.zeros((60, 1), np.float32),
               "reward": np.zeros(60, np.float32)}
    for call in (lambda: d.open_loop(agent.world_model, episode),
                 lambda: d.prediction_error(agent.world_model, [episode])):
        with pytest.raises(d.UserError, match="no decoder to draw.*--representation contrastive"):
            call()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"task": "cartpole_balance",
                                                 **dataclasses.asdict(cfg)}))
    state = {name: m.state_dict() for name, m in agent.modules().items()}
    torch.save({**state, "counters": {"updates": 0}, "last": {"eval/return": 0.0}},
               run / "checkpoint.pt")
    proc = subprocess.run([sys.executable, str(HERE / "plot.py"), str(run), "--openloop"],
                          capture_output=True, text=True, timeout=120, cwd=HERE,
                          env={**os.environ, "DREAMER_FILE": str(DREAMER_FILE)})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("plot.py: error: this world model has")


def test_nstep_value_estimate_targets_eq5_with_k_steps(agent_and_start):
    """--value_estimate nstep: the actor's (and so the value model's) target is V_N^k (Eq. 5) of
    s_1 … s_{H−1}, written out here with k = 3 and with k = H (0, the default: up to the horizon,
    bootstrapped from v(s_H))."""
    agent, z, h = agent_and_start
    H, g = agent.cfg.horizon, agent.cfg.discount
    for k in (3, 0):
        cfg = dataclasses.replace(agent.cfg, value_estimate="nstep", nstep_k=k)
        torch.manual_seed(5)
        _, feats, returns, _, _ = d.actor_loss(agent.world_model, agent.actor, agent.value, z, h,
                                               cfg)
        r, v = agent.world_model.reward(feats), agent.value(feats)       # s_1 … s_H: [H, N]
        T, k = H - 1, k or H
        expected = []
        for tau in range(T):
            end = min(tau + k, T)
            expected.append(sum(g ** (n - tau) * r[n] for n in range(tau, end))
                            + g ** (end - tau) * v[end])
        torch.testing.assert_close(returns, torch.stack(expected))


# ---------------------------------------------------------------------------------------------
# Where the gradients go (Sec. 3: world model fixed; Eq. 7 through the dynamics; Eq. 8 sg)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def agent_and_start():
    """An agent and start states z [3, 6, Z], h [3, 6, D] drawn at random, not filtered by the
    world model, so that the behaviour graders do not run world_model_loss or the RSSM steps."""
    torch.manual_seed(0)
    cfg = tiny_config()
    agent = d.Dreamer(cfg, 2)
    return agent, torch.randn(3, 6, cfg.stoch_size), torch.randn(3, 6, cfg.deter_size)


def test_behaviour_update_leaves_world_model_bit_identical(agent_and_start):
    agent, z, h = agent_and_start
    wm_before, value_before, actor_before = (snapshot(agent.world_model), snapshot(agent.value),
                                             snapshot(agent.actor))
    agent.model_opt.zero_grad(set_to_none=True)
    feats, returns, weights, _ = agent.update_actor(z, h)
    assert identical(wm_before, snapshot(agent.world_model))
    assert identical(value_before, snapshot(agent.value))       # Eq. 7 trains φ alone
    assert not identical(actor_before, snapshot(agent.actor))   # … and it did train φ
    assert all(p.grad is None for p in agent.world_model.parameters())   # none accumulated
    assert all(p.grad is None for p in agent.value.parameters())         # (value: frozen too)
    agent.update_value(feats, returns, weights)
    assert identical(wm_before, snapshot(agent.world_model))
    assert all(p.requires_grad for p in agent.world_model.parameters())  # unfrozen afterwards


def test_value_loss_sends_no_gradient_to_actor_or_world_model(agent_and_start):
    """Eq. 8 trains ψ alone: fed imagined states that still carry their graph (through the
    actor and the world model), update_value must leave every other gradient untouched."""
    agent, z, h = agent_and_start
    _, feats, returns, weights, _ = d.actor_loss(agent.world_model, agent.actor, agent.value,
                                                 z, h, agent.cfg)
    assert feats.requires_grad and returns.requires_grad            # the graph is still there
    for p in [*agent.actor.parameters(), *agent.world_model.parameters()]:
        p.grad = None
    value_before = snapshot(agent.value)
    agent.update_value(feats, returns, weights)
    assert all(p.grad is None for p in agent.actor.parameters())
    assert all(p.grad is None for p in agent.world_model.parameters())
    assert not identical(value_before, snapshot(agent.value))       # … and it did train ψ


def test_actor_loss_gradient_flows_through_dynamics_and_value_target_carries_none(agent_and_start):
    agent, z, h = agent_and_start
    cfg, wm = agent.cfg, agent.world_model
    loss, feats, returns, weights, _ = d.actor_loss(wm, agent.actor, agent.value, z, h, cfg)
    # The actor sees its input detached, and Eq. 7 has no term in a_τ itself: a non-zero
    # gradient can only have come back through the imagined transitions and the heads.
    grads = torch.autograd.grad(loss, list(agent.actor.parameters()), retain_graph=True)
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    # The same gradient, cut at the dynamics' action input, vanishes: the path is the dynamics.
    step = wm.rssm.imagine_step
    wm.rssm.imagine_step = lambda z_, h_, a: step(z_, h_, a.detach())
    cut, *_ = d.actor_loss(wm, agent.actor, agent.value, z, h, cfg)
    wm.rssm.imagine_step = step
    assert not cut.requires_grad or all(
        g is None or g.abs().sum() == 0
        for g in torch.autograd.grad(cut, list(agent.actor.parameters()), allow_unused=True))
    # Eq. 8: the target V_λ is gradient-stopped; the value loss reaches ψ only.
    vloss, _ = d.value_loss(agent.value, feats, returns, weights)
    others = list(agent.actor.parameters()) + list(wm.parameters())
    assert all(g is None for g in torch.autograd.grad(vloss, others, allow_unused=True))
    assert all(g is not None for g in torch.autograd.grad(vloss, list(agent.value.parameters())))


def test_actor_loss_gradient_is_that_of_the_explicit_eq7_sum(agent_and_start):
    """The gradient, not only the value: −mean_τ,n(γ^(τ−1)·V_λ(s_τ)) written out as Eq. 5/6
    sums over the same imagined trajectory (same noise), differentiated by autograd, gives the
    actor the same gradient as actor_loss. A target built from detached rewards or values, or
    other weights, gives another one (imagine's own gradient path has its own grader)."""
    agent, z, h = agent_and_start
    cfg, wm = agent.cfg, agent.world_model
    params = list(agent.actor.parameters())
    torch.manual_seed(3)
    loss, *_ = d.actor_loss(wm, agent.actor, agent.value, z, h, cfg)
    got = torch.autograd.grad(loss, params)
    torch.manual_seed(3)
    N = z.numel() // z.shape[-1]
    feats, _ = d.imagine(wm, agent.actor, z.reshape(N, -1), h.reshape(N, -1), cfg.horizon)
    r, v = wm.reward(feats), agent.value(feats)                     # s_1 … s_H: [H, N]
    H, g, lam = cfg.horizon, cfg.discount, cfg.lam
    T = H - 1                                                        # targets for s_1 … s_{H−1}

    def v_n(tau, k):                                                 # (Eq. 5), bootstrap v(s_H)
        end = min(tau + k, T)
        return sum(g ** (n - tau) * r[n] for n in range(tau, end)) + g ** (end - tau) * v[end]

    objective = 0
    for tau in range(T):                                             # (Eq. 6) then (Eq. 7)
        left = T - tau
        v_lam = (1 - lam) * sum(lam ** (n - 1) * v_n(tau, n) for n in range(1, left))
        v_lam = v_lam + lam ** (left - 1) * v_n(tau, left)
        objective = objective + g ** tau * v_lam.mean() / T
    expected = torch.autograd.grad(-objective, params)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_world_model_loss_decodes_the_posterior_state_cat_z_h():
    """The image and reward heads read s_t = cat(z_t, h_t) (the glossary's feat), the posterior
    states that world_model_loss returns, in that order."""
    cfg = tiny_config()
    torch.manual_seed(0)
    wm = d.WorldModel(cfg, 2)
    seen = {}
    decoder, reward = wm.decoder.forward, wm.reward.forward
    wm.decoder.forward = lambda feat: (seen.__setitem__("decoder", feat), decoder(feat))[1]
    wm.reward.forward = lambda feat: (seen.__setitem__("reward", feat), reward(feat))[1]
    _, _, z, h = d.world_model_loss(wm, fake_batch(cfg), cfg)
    assert cfg.stoch_size != cfg.deter_size                          # so the order shows
    for head in ("decoder", "reward"):
        torch.testing.assert_close(seen[head], torch.cat([z, h], -1), rtol=0, atol=0)


def test_train_step_learns_behaviour_in_the_world_model_from_before_its_step():
    """[official code] all three losses use the pre-update parameters: the actor after
    train_step equals an actor trained in the not-yet-stepped world model, not in the stepped one."""
    import copy
    cfg = tiny_config()
    torch.manual_seed(0)
    base, batch = d.Dreamer(cfg, 2), fake_batch(cfg)

    def actor_after(step_world_model_first):
        agent = copy.deepcopy(base)
        torch.manual_seed(1)
        if step_world_model_first is None:
            agent.train_step(batch)
        else:
            z, h, _ = agent.update_world_model(batch, step=step_world_model_first)
            agent.update_actor(z, h)
        return snapshot(agent.actor)

    official = actor_after(None)
    assert identical(official, actor_after(False))
    assert not identical(official, actor_after(True))


def test_actor_loss_no_value_ablation_targets_eq4(agent_and_start):
    agent, z, h = agent_and_start
    cfg = dataclasses.replace(agent.cfg, value_estimate="reward")
    torch.manual_seed(5)
    _, feats, returns, _, _ = d.actor_loss(agent.world_model, agent.actor, agent.value, z, h, cfg)
    reward = agent.world_model.reward(feats)                   # r(s_1) … r(s_H): [H, N]
    H = cfg.horizon                                            # (Eq. 4) V_R(s_τ) = Σ_{n=τ}^{H} r_n
    expected = torch.stack([sum(reward[n] for n in range(tau, H)) for tau in range(H - 1)])
    torch.testing.assert_close(returns, expected)


def test_imagine_rolls_the_actor_and_the_transition_forward_h_steps():
    """(Sec. 3) From s_0 = (z, h), H times: a_τ, ln q_φ(a_τ | s_τ) = actor(sg(cat(z_τ, h_τ))),
    sampled, then (z, h) ← rssm.imagine_step(z, h, a_τ). feats [H, N, F] = cat(z, h) of s_1 …
    s_H; log-probs [H, N] those of a_0 … a_{H−1}. Stub actor and transition make it exact."""
    cfg = tiny_config()
    wm = d.WorldModel(cfg, 2)
    N, Z, H = 4, cfg.stoch_size, 3
    seen = []

    def actor(feat, sample=True):
        seen.append((feat.detach().clone(), feat.requires_grad, sample))
        return torch.tanh(feat[:, :2]), torch.full((feat.shape[0],), float(len(seen)))

    def transition(z, h, action):
        return z + 1 + action.sum(-1, keepdim=True), 0.5 * h

    wm.rssm.imagine_step = transition
    z0 = torch.randn(N, Z, requires_grad=True)
    h0 = torch.randn(N, cfg.deter_size, requires_grad=True)
    feats, log_probs = d.imagine(wm, actor, z0, h0, H)
    z, h, expected, inputs = z0.detach(), h0.detach(), [], []
    for _ in range(H):
        inputs.append(torch.cat([z, h], -1))
        z, h = transition(z, h, torch.tanh(inputs[-1][:, :2]))
        expected.append(torch.cat([z, h], -1))
    assert feats.shape == (H, N, Z + cfg.deter_size) and log_probs.shape == (H, N)
    torch.testing.assert_close(feats.detach(), torch.stack(expected))
    torch.testing.assert_close(log_probs, torch.arange(1.0, H + 1)[:, None].expand(H, N))
    assert len(seen) == H
    for (feat, needs_grad, sample), want in zip(seen, inputs):
        torch.testing.assert_close(feat, want)
        assert not needs_grad and sample is True      # sg(s_τ), and a sample, not the mode
    assert feats.requires_grad                        # the states keep their path to the action


def test_actor_sees_detached_states_and_first_imagined_state_follows_first_action(
        agent_and_start):
    agent, z, h = agent_and_start
    seen = []
    forward = agent.actor.forward
    agent.actor.forward = lambda feat, sample=True: (seen.append(feat.requires_grad),
                                                     forward(feat, sample))[1]
    feats, _ = d.imagine(agent.world_model, agent.actor, z.reshape(-1, z.shape[-1]),
                         h.reshape(-1, h.shape[-1]), agent.cfg.horizon)
    assert len(seen) == agent.cfg.horizon and not any(seen)   # [official code] sg(s_τ) each step
    first = torch.autograd.grad(feats[0].sum(), list(agent.actor.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in first)   # s_1 follows a_0


def test_actor_loss_targets_the_returns_of_its_own_imagination(agent_and_start):
    agent, z, h = agent_and_start
    cfg = agent.cfg
    loss, feats, returns, _, _ = d.actor_loss(agent.world_model, agent.actor, agent.value,
                                              z, h, cfg)
    H, g, N = cfg.horizon, cfg.discount, feats.shape[1]
    with torch.no_grad():
        r, v = agent.world_model.reward(feats), agent.value(feats)     # s_1 … s_H: [H, N]
    r, v = r.double().numpy(), v.double().numpy()
    # Eq. 5/6 as explicit sums: V_λ(s_τ) for s_1 … s_{H−1}, each with v(s_H) as the bootstrap.
    ref = np.stack([explicit_lambda_return(r[:-1, n], v[:-1, n], v[-1, n], g, cfg.lam)
                    for n in range(N)], 1)                             # [H−1, N]
    np.testing.assert_allclose(returns.detach().double().numpy(), ref, rtol=1e-4, atol=1e-4)
    # Eq. 7 [official code]: −mean over τ and starts of γ^(τ−1)·V_λ(s_τ).
    objective = np.mean([g ** tau * ref[tau].mean() for tau in range(H - 1)])
    assert loss.item() == pytest.approx(-objective, rel=1e-4, abs=1e-5)
    # Value loss (Eq. 8) [official code]: ½·mean(w·(v_ψ(s_τ) − V_λ(s_τ))²) over s_1 … s_{H−1},
    # written as a loop over the imagined steps, for arbitrary weights w.
    w = torch.rand_like(returns)
    vloss, _ = d.value_loss(agent.value, feats, returns, w)
    with torch.no_grad():
        per_step = [(w[tau] * 0.5 * (agent.value(feats[tau]) - returns[tau]) ** 2).mean()
                    for tau in range(H - 1)]
    assert vloss.item() == pytest.approx(sum(per_step).item() / (H - 1), rel=1e-5)


def test_actor_step_increases_the_objective_of_eq7(agent_and_start):
    agent, z, h = agent_and_start
    cfg = dataclasses.replace(agent.cfg, actor_lr=1e-3)
    agent.actor_opt = torch.optim.Adam(agent.actor.parameters(), cfg.actor_lr)

    def objective():
        torch.manual_seed(7)                   # the same imagination noise each time
        with torch.no_grad():                  # E[Σ w·V_λ] from actor_loss's returns and weights
            _, _, returns, weights, _ = d.actor_loss(agent.world_model, agent.actor, agent.value,
                                                     z, h, cfg)
            return (weights * returns).mean()

    before = objective()
    torch.manual_seed(7)
    agent.update_actor(z, h)
    assert objective() > before


def test_actor_loss_entropy_bonus_is_off_by_default_and_pulls_a_saturated_actor_back(agent_and_start):
    """--actor_entropy η (not in the paper; default 0) subtracts η·E[−ln q_φ(a_τ | s_τ)] from the
    actor loss. At saturation (tanh u ≈ ±1) the return's gradient on the mean vanishes; the
    bonus's does not, and points back toward the middle of the action range."""
    agent, z, h = agent_and_start
    assert agent.cfg.actor_entropy == 0
    last = agent.actor.net[-1]
    A = last.out_features // 2
    with torch.no_grad():                      # μ = 5·tanh(20/5) ≈ 5, σ ≈ 10⁻⁴ for every state
        last.weight.zero_()
        last.bias[:A], last.bias[A:] = 20.0, -20.0

    def loss_and_mean_grad(eta):
        cfg = dataclasses.replace(agent.cfg, actor_entropy=eta)
        agent.actor.zero_grad()
        torch.manual_seed(3)                   # the same imagination noise each time
        loss, _, _, _, metrics = d.actor_loss(agent.world_model, agent.actor, agent.value, z, h,
                                              cfg)
        loss.backward()
        return loss.detach(), metrics["actor/entropy"], last.bias.grad[:A].clone()

    torch.manual_seed(3)
    _, log_probs = d.imagine(agent.world_model, agent.actor, z.reshape(-1, z.shape[-1]),
                             h.reshape(-1, h.shape[-1]), agent.cfg.horizon)
    loss0, entropy, grad0 = loss_and_mean_grad(0.0)
    torch.testing.assert_close(entropy, -log_probs.detach().mean())     # H ≈ −ln q, one sample
    loss1, _, grad1 = loss_and_mean_grad(1e-2)
    torch.testing.assert_close(loss1, loss0 - 1e-2 * entropy)
    assert grad0.abs().max() < 1e-6                                     # saturated: no signal
    assert (grad1 > 0).all() and grad1.min() > 100 * grad0.abs().max()  # descent lowers μ


def test_return_scale_is_an_ema_of_the_5_to_95_percentile_range_floored_at_one():
    """--return_norm percentile (DreamerV3, not in the paper): S ← 0.99·S + 0.01·(Per(R, 95) −
    Per(R, 5)) from S = 0, and the divisor is max(1, S); checked against numpy's percentiles."""
    norm = d.ReturnScale()
    g = np.random.default_rng(0)
    S = 0.0
    for k, spread in enumerate([0.5, 300.0, 300.0, 2.0, 1e4]):
        returns = g.normal(5.0, spread, size=(14, 24)).astype(np.float32)
        got = norm(torch.from_numpy(returns))
        S = 0.99 * S + 0.01 * (np.percentile(returns, 95) - np.percentile(returns, 5))
        np.testing.assert_allclose(float(norm.scale), S, rtol=1e-5)
        np.testing.assert_allclose(float(got), max(1.0, S), rtol=1e-5)
        assert (float(got) == 1.0) == (S <= 1.0)          # small returns are never scaled up
    assert d.Config().return_norm == "none" and d.RETURN_NORMS["none"]() is None


def test_actor_loss_with_return_scale_divides_the_return_term_not_the_entropy(agent_and_start):
    """With a ReturnScale the actor loss is −mean(w·V_λ) / max(1, S) − η·H: the same imagined
    trajectory (same noise) as without, its return term and gradient divided by the updated
    max(1, S), the entropy bonus not; S is logged as actor/return_scale."""
    agent, z, h = agent_and_start
    params = list(agent.actor.parameters())

    def loss_and_grads(eta, return_scale):
        cfg = dataclasses.replace(agent.cfg, actor_entropy=eta)
        torch.manual_seed(3)
        loss, _, returns, _, metrics = d.actor_loss(agent.world_model, agent.actor, agent.value,
                                                    z, h, cfg, return_scale)
        return loss, torch.autograd.grad(loss, params), returns, metrics

    plain, plain_grads, returns, metrics = loss_and_grads(1e-2, None)
    assert "actor/return_scale" not in metrics
    norm = d.ReturnScale()
    norm.scale.fill_(400.0)                                # an S well above the floor
    scaled, _, _, metrics = loss_and_grads(1e-2, norm)
    q = np.percentile(returns.detach().numpy(), [5, 95])
    S = 0.99 * 400.0 + 0.01 * (q[1] - q[0])
    torch.testing.assert_close(metrics["actor/return_scale"], torch.tensor(S, dtype=torch.float32))
    entropy = metrics["actor/entropy"]
    torch.testing.assert_close(scaled, (plain + 1e-2 * entropy) / S - 1e-2 * entropy)
    _, grads, _, _ = loss_and_grads(0.0, None)
    norm.scale.fill_(400.0)
    _, scaled_grads, _, _ = loss_and_grads(0.0, norm)
    for a, b in zip(scaled_grads, grads):
        torch.testing.assert_close(a, b / S, rtol=1e-4, atol=1e-9)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(plain_grads, grads))  # η mattered


def test_return_norm_run_checkpoints_its_scale_resumes_it_and_exports(tmp_path):
    """A tiny run with --return_norm percentile: S is in the checkpoint and grows on from the
    saved value after a resume (a fresh S restarts from 0); the exported agent loads."""
    logdir = tmp_path / "run"
    args = [*E2E, "--return_norm", "percentile", "--actor_entropy", "3e-4", "--logdir",
            str(logdir)]
    assert run_cli(*args, "--steps", "600").returncode == 0
    saved = float(torch.load(logdir / "checkpoint.pt", weights_only=False)["return_scale"]["scale"])
    before = [m["actor/return_scale"] for m in read_metrics(logdir) if "actor/return_scale" in m]
    assert saved > 0 and len(before) == 2 and before[1] > before[0]
    proc = run_cli(*args, "--steps", "800")
    assert proc.returncode == 0, proc.stderr
    after = [m["actor/return_scale"] for m in read_metrics(logdir) if "actor/return_scale" in m]
    assert len(after) == 3 and after[2] > 0.95 * saved   # 5 fresh updates: S ≈ 0.05 · range
    d.export_agent(logdir, tmp_path / "agent")
    _, cfg, agent, _ = d.load_agent(tmp_path / "agent")
    assert cfg.return_norm == "percentile" and float(agent.return_scale.scale) > 0


def test_gradients_are_clipped_and_do_not_accumulate(agent_and_start):
    agent, z, h = agent_and_start
    agent.cfg = dataclasses.replace(agent.cfg, grad_clip=1e-3)
    params = list(agent.value.parameters())
    feats = torch.randn(4, 10, agent.cfg.stoch_size + agent.cfg.deter_size)
    norm = agent._step((agent.value(feats) ** 2).mean(), agent.value, agent.value_opt)
    loss = (agent.value(feats) - 3).abs().mean()
    expected = torch.autograd.grad(loss, params, retain_graph=True)
    norm = agent._step(loss, agent.value, agent.value_opt)
    assert norm > 1e-3                          # the raw norm is returned …
    clipped = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    assert clipped <= 1e-3 * (1 + 1e-4)         # … the gradient used was clipped to 1e-3
    for p, g in zip(params, expected):          # and it is the last loss's alone, scaled
        torch.testing.assert_close(p.grad, g * (1e-3 / norm), rtol=1e-4, atol=1e-9)


def test_act_filters_with_the_posterior_and_remembers_the_executed_action():
    torch.manual_seed(0)
    cfg = tiny_config()
    agent = d.Dreamer(cfg, 2)
    obs = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    action, (z, h, prev) = agent.act(obs, None, explore=True)
    assert np.abs(action).max() <= 1
    np.testing.assert_array_equal(prev[0].numpy(), action)   # the noisy, clipped action
    torch.manual_seed(1)
    mode, (z2, h2, _) = agent.act(obs, None, explore=False)
    with torch.no_grad():
        mean, _ = agent.actor.dist_params(torch.cat([z2, h2], -1))
    np.testing.assert_allclose(mode, torch.tanh(mean)[0].numpy(), rtol=1e-6)   # tanh(μ), no noise
    torch.manual_seed(1)
    _, (z3, _, _) = agent.act(255 - obs, None, explore=False)
    assert not torch.equal(z2, z3)                             # z_t depends on the image


def test_actor_loss_weights_are_cumulative_discounts(agent_and_start):
    agent, z, h = agent_and_start
    _, _, returns, weights, _ = d.actor_loss(agent.world_model, agent.actor, agent.value, z, h,
                                             agent.cfg)
    H, g = agent.cfg.horizon, agent.cfg.discount
    assert returns.shape == (H - 1, z.numel() // z.shape[-1])
    assert weights.shape == returns.shape
    torch.testing.assert_close(weights[:, 0], torch.tensor([g ** k for k in range(H - 1)]))


def test_value_loss_is_eq8_weighted_half_squared_error_against_a_fixed_target():
    """(Eq. 8) ½‖v_ψ(s_τ) − V_λ(s_τ)‖² over s_1 … s_{H−1}, step τ weighted by w_τ, averaged over
    steps and starts [official code], written as a loop; the target carries no gradient."""
    cfg = tiny_config()
    torch.manual_seed(0)
    value = d.ValueModel(cfg)
    H, N, F = 5, 7, cfg.stoch_size + cfg.deter_size
    feats, returns = torch.randn(H, N, F), torch.randn(H - 1, N, requires_grad=True)
    weights = torch.rand(H - 1, N)
    loss, metrics = d.value_loss(value, feats, returns, weights)
    with torch.no_grad():
        total = sum(weights[t, n] * 0.5 * (value(feats[t, n]) - returns[t, n]) ** 2
                    for t in range(H - 1) for n in range(N))
    assert loss.item() == pytest.approx(total.item() / ((H - 1) * N), rel=1e-5)
    assert metrics["value/loss"].item() == pytest.approx(loss.item())
    loss.backward()
    assert returns.grad is None                       # sg(V_λ): the target is not trained


# ---------------------------------------------------------------------------------------------
# Replay buffer: (a_{t−1}, r_t, o_t) alignment and episode boundaries
# ---------------------------------------------------------------------------------------------

class CountingEnv:
    """A fake env whose image encodes (episode, step), whose reward is a function of the
    action just taken, so that alignment errors are visible; with `ends`, its last step is
    terminal (an early end), else a time-out."""
    action_dim = 1

    def __init__(self, episode_id, length, ends=False):
        self.id, self.length, self.t, self.ends = episode_id, length, 0, ends

    def image(self):
        return np.stack([np.full((64, 64), self.id, np.uint8), np.full((64, 64), self.t, np.uint8),
                         np.zeros((64, 64), np.uint8)])

    def reset(self):
        self.t = 0
        return self.image()

    def step(self, action):
        self.t += 1
        done = self.t >= self.length
        return self.image(), 10.0 * float(action[0]) + self.t, done, done and self.ends


def test_replay_sample_rows_hold_previous_action_and_reward_received_with_observation(tmp_path):
    replay = d.ReplayBuffer(tmp_path / "episodes", seed=0)
    for i, length in enumerate([20, 35, 8]):          # the 8-step episode is too short for L=10
        policy = lambda obs, state: (np.array([obs[1, 0, 0] / 100.0]), None)   # a_t = t/100
        episode, ret = d.run_episode(CountingEnv(i, length, ends=i == 1), policy)
        assert episode["obs"].shape == (length + 1, 3, 64, 64) and episode["obs"].dtype == np.uint8
        assert episode["terminal"].tolist() == [False] * length + [i == 1]   # o_T ended it
        assert episode["action"][0] == 0 and episode["reward"][0] == 0
        assert ret == pytest.approx(episode["reward"].sum())
        replay.add(episode)
    assert replay.num_steps == 20 + 35 + 8
    batch = replay.sample(64, 10)
    assert batch["obs"].shape == (64, 10, 3, 64, 64) and batch["action"].shape == (64, 10, 1)
    seen = set()
    for b in range(64):
        ep, t = batch["obs"][b, :, 0, 0, 0], batch["obs"][b, :, 1, 0, 0].astype(int)
        assert (ep == ep[0]).all() and ep[0] != 2     # one episode per chunk; never the short one
        assert (np.diff(t) == 1).all()                # consecutive steps
        seen.add(int(ep[0]))
        for k in range(10):
            if t[k] == 0:                             # first row: zero action, zero reward
                assert batch["action"][b, k, 0] == 0 and batch["reward"][b, k] == 0
            else:                                     # row t: a_{t−1} = (t−1)/100, r_t from it
                assert batch["action"][b, k, 0] == pytest.approx((t[k] - 1) / 100)
                assert batch["reward"][b, k] == pytest.approx(10 * (t[k] - 1) / 100 + t[k])
            assert batch["terminal"][b, k] == (ep[0] == 1 and t[k] == 35)   # only that o_T
    assert seen == {0, 1}
    # Episodes were written to disk and read back identically.
    again = d.ReplayBuffer(tmp_path / "episodes")
    again.load()
    assert len(again.episodes) == 3
    for a, b in zip(replay.episodes, again.episodes):
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_replay_samples_every_window_including_the_last(tmp_path):
    replay = d.ReplayBuffer(seed=0)
    replay.add({"obs": np.arange(6, dtype=np.uint8)[:, None, None, None] * np.ones((1, 3, 64, 64),
                                                                              np.uint8),
                "action": np.zeros((6, 1), np.float32), "reward": np.arange(6, dtype=np.float32)})
    starts = {int(replay.sample(1, 5)["reward"][0, 0]) for _ in range(50)}
    assert starts == {0, 1}                   # an episode of L + 1 rows has two windows


def test_replay_never_overwrites_an_episode_file(tmp_path):
    replay = d.ReplayBuffer(tmp_path)
    episode = {"obs": np.zeros((3, 3, 64, 64), np.uint8), "action": np.zeros((3, 1), np.float32),
               "reward": np.zeros(3, np.float32)}
    for _ in range(3):
        replay.add(episode)
    (tmp_path / "000001.npz").rename(tmp_path / "aside.bak")   # a user moves a bad file away
    again = d.ReplayBuffer(tmp_path)
    again.load()
    again.add(episode)
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["000000.npz", "000002.npz",
                                                             "000003.npz"]


def test_replay_capacity_keeps_the_newest_episodes_in_memory_and_every_file(tmp_path,
                                                                            monkeypatch):
    """Not in the paper (--replay_capacity): past N transitions in memory, the oldest episodes
    leave memory first and the newest always stays; every file stays on disk and in the run's
    counts; sampling draws from memory only; a buffer loaded from the files holds what the one
    that wrote them holds, reading the arrays of those files only (so that loading never needs
    more memory than the capacity), and reads a left-out episode from its file."""
    def episode(i, rows):
        return {"obs": np.full((rows, 3, 64, 64), i, np.uint8),
                "action": np.zeros((rows, 1), np.float32), "reward": np.full(rows, i, np.float32),
                "terminal": np.zeros(rows, bool)}
    rows = [20, 30, 10, 25, 15, 40]                   # transitions: 19, 29, 9, 24, 14, 39
    # In memory after each add, worked out by hand for N = 50: 19; 48; 57 > 50, so episode 0
    # leaves: 38; 62, 1 leaves: 33; 47; 86, then 2, 3 and 4 leave: 39.
    held = [{0}, {0, 1}, {1, 2}, {2, 3}, {2, 3, 4}, {5}]
    replay = d.ReplayBuffer(tmp_path, seed=0, capacity=50)
    for i, n in enumerate(rows):
        replay.add(episode(i, n))
        ids = [int(e["reward"][0]) for e in replay.episodes]
        assert set(ids) == held[i] and ids == sorted(ids), i
        assert replay.in_memory == sum(rows[j] - 1 for j in held[i]) <= 50
        assert replay.num_episodes == i + 1 and replay.num_steps == sum(rows[:i + 1]) - (i + 1)
        assert len(list(tmp_path.glob("*.npz"))) == i + 1              # nothing deleted
        drawn = set(replay.sample(32, 10)["reward"][:, 0].astype(int).tolist())
        assert drawn <= held[i]
    read, full = d.ReplayBuffer.read, []
    def spy(path, keys=("obs", "action", "reward", "terminal")):
        full.extend([int(Path(path).stem)] * ("obs" in keys))
        return read(path, keys)
    monkeypatch.setattr(d.ReplayBuffer, "read", staticmethod(spy))
    for capacity, expect in [(50, {5}), (60, {4, 5}), (0, set(range(6)))]:
        again, full[:] = d.ReplayBuffer(tmp_path, capacity=capacity), []
        again.load()
        assert {int(e["reward"][0]) for e in again.episodes} == expect == set(full), capacity
        assert again.lengths == [n - 1 for n in rows] and again.next_index == 6
        assert np.array_equal(again.episode(0)["obs"], episode(0, 20)["obs"])   # from its file
        assert np.array_equal(again.episode(5)["reward"], episode(5, 40)["reward"])


def test_save_atomically_keeps_old_file_when_write_fails(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")

    def broken(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        d.save_atomically(path, broken)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]   # no temporary file left


# ---------------------------------------------------------------------------------------------
# Environment and command line
# ---------------------------------------------------------------------------------------------

def test_task_names():
    assert d.parse_task("reacher_easy") == ("reacher", "easy")
    assert d.parse_task("cup_catch") == ("ball_in_cup", "catch")
    assert d.parse_task("ball_in_cup_catch") == ("ball_in_cup", "catch")
    assert d.parse_task("cartpole_swingup_sparse") == ("cartpole", "swingup_sparse")
    assert d.parse_task("humanoid_CMU_run") == ("humanoid_CMU", "run")
    paper_tasks = ("acrobot_swingup cartpole_balance cartpole_balance_sparse cartpole_swingup "
                   "cartpole_swingup_sparse cheetah_run cup_catch finger_spin finger_turn_easy "
                   "finger_turn_hard hopper_hop hopper_stand pendulum_swingup quadruped_run "
                   "quadruped_walk reacher_easy reacher_hard walker_run walker_stand walker_walk")
    for name in paper_tasks.split():
        d.parse_task(name)
    for bad in ("reacher", "Reacher-Easy", "reacher_impossible", "reacher easy", ""):
        with pytest.raises(d.UserError):
            d.parse_task(bad)


def test_every_task_the_program_accepts_runs_and_the_others_are_refused():
    """Each name in all_tasks() (the list an unknown name prints) loads, resets and steps at the
    corners of the action box, the most violent actions the actor can send, with finite rewards
    and images; every DMC task left out of it is refused by name with its reason."""
    from dm_control import suite
    accepted = d.all_tasks()
    for domain, task in suite.ALL_TASKS:
        name = f"{domain}_{task}"
        if name not in accepted:
            with pytest.raises(d.UserError, match=f"{name} cannot be run by this agent"):
                d.parse_task(name)
    assert "lqr_lqr_2_1" not in accepted and len(accepted) >= 50
    for name in accepted:
        env = d.make_env(name, action_repeat=2, time_limit=20, shadow_size=64)
        obs, done, steps = env.reset(), False, 0
        corners = np.array([[1.0] * env.action_dim, [-1.0] * env.action_dim])
        while not done:
            obs, reward, done, terminal = env.step(corners[steps % 2])
            steps += 1
            assert np.isfinite(reward) and obs.shape == (3, 64, 64), name
            assert not terminal, name                   # a DMC episode only times out
        assert steps == 10, name


def test_a_non_finite_action_never_reaches_mujoco():
    env = d.make_env("reacher_easy", time_limit=20, shadow_size=64)
    env.reset()
    before = env.env.physics.get_state().copy()
    for bad in ([np.nan, 0.0], [0.0, np.inf]):
        with pytest.raises(d.Diverged, match=r"non-finite action \(1 of 2 entries\)"):
            env.step(bad)
    assert np.array_equal(env.env.physics.get_state(), before) and env.steps == 0


def test_real_environment_shapes_and_action_repeat():
    env = d.make_env("reacher_easy", action_repeat=2, time_limit=10, seed=0)
    obs = env.reset()
    assert obs.shape == (3, 64, 64) and obs.dtype == np.uint8 and obs.std() > 0
    dones = [env.step(np.zeros(env.action_dim))[2] for _ in range(5)]
    assert dones == [False] * 4 + [True] and env.steps == 10   # 5 agent steps × R = 10 env steps


def test_small_shadow_map_is_applied_and_changes_few_pixels():
    """--shadow_size is a renderer setting: the same scene, a few shadow-edge pixels differ."""
    frames = {}
    for size in (2048, 256):
        env = d.make_env("reacher_easy", time_limit=10, seed=0, shadow_size=size)
        assert env.env.physics.model.vis.quality.shadowsize == size
        frames[size] = env.reset().astype(int)
    diff = np.abs(frames[2048] - frames[256])
    assert 0 < (diff.sum(0) > 0).mean() < 0.02 and diff.mean() < 0.5


def test_bf16_without_native_support_warns(monkeypatch, capsys):
    monkeypatch.setattr(d, "bf16_is_native", lambda device: False)
    monkeypatch.setattr(d, "benchmark", lambda *a, **k: None)
    assert d.main(["--precision", "bf16", "--benchmark", "--device", "cpu"]) == 0
    assert "no native bfloat16" in capsys.readouterr().err
    assert d.main(["--benchmark", "--device", "cpu"]) == 0     # fp32: nothing to warn about
    assert capsys.readouterr().err == ""


def test_cpu_preset_changes_only_compute_and_schedule():
    # The cpu preset may shrink compute, never the algorithm: action repeat, pixels (fixed),
    # sequence length, horizon, learning rates, discounts and loss terms stay the paper's.
    cfg, args = d.parse_args(["--preset", "cpu"])
    paper = d.Config()
    changed = {f.name for f in dataclasses.fields(d.Config)
               if getattr(cfg, f.name) != getattr(paper, f.name)}
    assert changed == {"steps", "train_steps", "batch_size", "cnn_depth", "units", "shadow_size",
                       "eval_episodes"}
    assert cfg.steps == 100_000 and cfg.action_repeat == 2
    assert args.logdir == os.path.join("runs", "reacher_easy-cpu-s0")


def test_flags_cover_every_config_field_and_presets_override():
    cfg, args = d.parse_args(["--preset", "tiny", "--batch_size", "3", "--lam", "0.5"])
    assert cfg.batch_size == 3 and cfg.lam == 0.5 and cfg.deter_size == d.PRESETS["tiny"]["deter_size"]
    assert args.logdir == os.path.join("runs", "reacher_easy-tiny-s0")
    cfg, _ = d.parse_args([])
    assert cfg == d.Config()
    help_text = d.build_parser().format_help()
    for f in dataclasses.fields(d.Config):
        assert f"--{f.name}" in help_text


BAD_ARGS = [
    (["--env", "reacher_impossible"], "unknown task"),
    (["--env", "Reacher-Easy"], "malformed task name"),
    (["--steps", "-5"], "--steps must be > 0"),
    (["--steps", "0"], "--steps must be > 0"),
    (["--preset", "huge"], "unknown preset"),
    (["--batch_size", "many"], "invalid int value"),
    (["--lam", "1.5"], "must be ≤ 1"),
    (["--value_estimate", "magic"], "must be lambda, nstep or reward"),
    (["--precision", "fp8"], "must be fp32 or bf16"),
    (["--shadow_size", "100000"], "--shadow_size must be at most 8192"),
    (["--seed", str(2 ** 32 - 1)], "--seed must be in"),
    (["--shadow_size", "0"], "--shadow_size must be > 0"),
    (["--seed", "-1"], "--seed must be in"),
    (["--actor_init_std", "nan"], "must be a finite number"),
    (["--actor_entropy", "-0.1"], "--actor_entropy must be ≥ 0"),
    (["--time_limit", "5000", "--batch_length", "1000"], "longer than an episode of reacher_easy"),
    (["--no_such_flag", "1"], "unrecognized arguments"),
    # Values that used to pass validation and fail (or silently do nothing) later in the run.
    (["--horizon", "1"], "--horizon must be ≥ 2"),
    (["--action_repeat", "3"], "--time_limit 1000 must be a multiple of --action_repeat 3"),
    (["--action_repeat", "7", "--time_limit", "7000"], "not a multiple of --action_repeat 7"),
    (["--steps", "1000"], "before the first update"),
    (["--seed_episodes", "10", "--steps", "10000"], "before the first update"),
    (["--env", "lqr_lqr_2_1"], "lqr_lqr_2_1 cannot be run by this agent: its action bounds"),
    # Atari: an unknown game, and flags that belong to the other kind of task.
    (["--env", "atari_pongg"], "unknown Atari game 'pongg'; valid: atari_adventure, "),
    (["--env", "reacher_easy", "--preset", "atari"], "--preset atari is for atari_ tasks"),
    (["--env", "atari_pong", "--shadow_size", "256"], "--shadow_size shapes continuous actions"),
    (["--env", "atari_pong", "--actor_dist", "tanh_normal"], "the actor must be onehot"),
    (["--env", "reacher_easy", "--actor_dist", "onehot"], "onehot is for discrete actions"),
    (["--env", "reacher_easy", "--epsilon_start", "0.2"], "--epsilon_start is ε-greedy"),
    (["--env", "atari_pong", "--epsilon_end", "1.5"], "are probabilities, ≤ 1"),
    (["--env", "atari_pong", "--actor_entropy", "1e-3"], "not for the one-hot actor"),
    (["--env", "atari_pong", "--value_estimate", "reward"], "does not go with a discount"),
    # An ablation whose arm cannot run on the task is refused before any arm starts.
    (["--env", "atari_pong", "--ablation", "value"], "--ablation value: its reward arm "
     "(--value_estimate reward) cannot run on atari_pong: --value_estimate reward"),
    (["--env", "atari_pong", "--epsilon_eval", "2"], "are probabilities, ≤ 1"),
    (["--env", "reacher_easy", "--epsilon_eval", "0.01"], "--epsilon_eval is ε-greedy"),
    # The replay's bound: one whole episode at least.
    (["--replay_capacity", "-1"], "--replay_capacity must be ≥ 0"),
    (["--replay_capacity", "999"], "--replay_capacity 999 holds less than one episode of "
                                   "reacher_easy (1000 env steps)"),
]


@pytest.mark.parametrize("argv,message", BAD_ARGS)
def test_bad_input_gives_one_clear_line(argv, message, capsys, tmp_path):
    assert d.main(argv + ["--logdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dreamer.py: error:") and message in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_a_logdir_that_cannot_be_a_folder_gives_one_clear_line(capsys, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    for logdir, message in [("", "--logdir needs a folder name"),
                            (str(tmp_path / "file"), "cannot write to the logdir")]:
        assert d.main([*E2E, "--logdir", logdir]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dreamer.py: error:") and message in err and "\n" not in err
    assert (tmp_path / "file").read_text() == "not a folder"


# ---------------------------------------------------------------------------------------------
# End to end on a real dm_control task: train, write, resume, seed, interrupt, refuse bad files
# ---------------------------------------------------------------------------------------------

# Tiny networks and 100-step episodes (200 env steps) keep each run to seconds.
E2E = ["--env", "reacher_easy", "--preset", "tiny", "--time_limit", "200", "--train_every", "200",
       "--eval_every", "400", "--checkpoint_every", "400", "--seed", "3", "--device", "cpu"]


def run_cli(*args, timeout=300):
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    return subprocess.run([sys.executable, str(DREAMER_FILE), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=HERE)


def read_metrics(logdir):
    return [json.loads(line) for line in (Path(logdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("e2e") / "run"
    first = run_cli(*E2E, "--steps", "600", "--logdir", str(logdir))
    return logdir, first, read_metrics(logdir)


def test_end_to_end_run_writes_metrics_episodes_checkpoint(trained):
    logdir, proc, metrics = trained
    assert proc.returncode == 0, proc.stderr
    assert "parameters:" in proc.stdout and "device cpu" in proc.stdout
    assert sorted(p.name for p in (logdir / "episodes").glob("*.npz")) == [
        "000000.npz", "000001.npz", "000002.npz"]
    assert (logdir / "checkpoint.pt").exists() and (logdir / "config.json").exists()
    assert not list(logdir.rglob("*.tmp"))
    steps = [m["step"] for m in metrics if "train/return" in m]
    assert steps == [200, 400, 600]
    losses = [m for m in metrics if "model/loss" in m]
    assert len(losses) == 2                            # after the seed episode, every 200 steps
    for key in ("model/image_loss", "model/reward_loss", "model/kl", "actor/loss", "value/loss",
                "actor/entropy", "model/grad_norm", "actor/grad_norm", "value/grad_norm"):
        assert all(math.isfinite(m[key]) for m in losses), key
    assert [m["step"] for m in metrics if "eval/return" in m] == [400, 600]
    ep = np.load(logdir / "episodes" / "000001.npz")
    assert ep["obs"].dtype == np.uint8 and ep["obs"].shape == (101, 3, 64, 64)
    assert np.abs(ep["action"][1:]).max() <= 1 and ep["action"].shape == (101, 2)


def test_each_episode_logs_its_action_saturation_and_each_phase_the_actors_mean(trained):
    """train/action_saturation = the fraction of the episode's executed action entries with
    |a| > 0.95, recomputed from its episode file; actor/mean_abs = mean |μ| is logged per phase."""
    logdir, _, metrics = trained
    saturation = [m["train/action_saturation"] for m in metrics if "train/return" in m]
    files = sorted((logdir / "episodes").glob("*.npz"))
    assert len(saturation) == len(files)
    for value, path in zip(saturation, files):
        actions = np.load(path)["action"][1:]                    # row 0 holds no action
        assert value == pytest.approx((np.abs(actions) > 0.95).sum() / actions.size)
    phases = [m for m in metrics if "model/loss" in m]
    assert phases and all(0 <= m["actor/saturation"] <= 1 for m in phases)


def test_actor_saturation_is_the_share_of_mode_actions_at_the_bounds(agent_and_start):
    """actor/saturation: the fraction of the start states' mode actions with |a| > 0.95, for
    the paper's actor and the variant; actor/mean_abs: their mean |μ| (pre-tanh for the paper's)."""
    _, z, h = agent_and_start
    for dist, raw_mean, expected_abs in (("tanh_normal", 3.0, 5 * math.tanh(3.0 / 5)),
                                         ("trunc_normal", 3.0, math.tanh(3.0))):
        torch.manual_seed(0)
        agent = d.Dreamer(tiny_config(actor_dist=dist), 2)
        last = agent.actor.net[-1]
        torch.nn.init.zeros_(last.weight)
        with torch.no_grad():                  # one entry at the bound (|tanh 3| = 0.995), one at 0
            last.bias.copy_(torch.tensor([raw_mean, 0.0, 0.0, 0.0]))
        _, _, _, metrics = agent.update_actor(z, h)
        assert metrics["actor/saturation"].item() == pytest.approx(0.5), dist
        assert metrics["actor/mean_abs"].item() == pytest.approx(expected_abs / 2, rel=1e-5), dist


def test_a_stuck_actor_is_reported_once_and_the_run_goes_on(capsys):
    """actor_stuck: 3 phases in a row with the mode of ≥ 50 % of the actions at the bounds and
    the actor's gradient norm ≤ 0.05; watch_actor prints one note, once, per process."""
    stuck, healthy = (0.9, 0.003), (0.9, 0.2)
    assert d.actor_stuck([stuck] * 3) and d.actor_stuck([healthy, stuck, stuck, stuck])
    assert not d.actor_stuck([stuck] * 2)
    assert not d.actor_stuck([stuck, healthy, stuck])
    assert not d.actor_stuck([(0.3, 0.003)] * 3)                  # gradient small, not saturated
    assert d.action_saturation(np.array([[0.96, 0.0], [-1.0, 0.95]])) == 0.5
    # The gradient norms that the committed cpu runs logged, phase by phase: reacher_easy seeds
    # 0 and 1 collapsed (results/README.md, "Is the actor stuck?"); cartpole_balance seed 1's
    # gradient never stayed small. With saturated modes, the first two are flagged in time.
    def first_flag(run):
        grads = [m["actor/grad_norm"] for m in read_metrics(HERE / "results" / run)
                 if "actor/grad_norm" in m]
        return next((i for i in range(len(grads)) if d.actor_stuck([(1.0, g) for g in
                                                                    grads[:i + 1]])), None)
    assert first_flag("cpu-reacher_easy-s0") == 9             # the phase at 14k env steps
    assert first_flag("cpu-reacher_easy-s1") == 5             # at 10k
    assert first_flag("cpu-cartpole_balance-s1") is None
    trainer = type("T", (), {"actor_history": [], "warned_stuck": False})()
    for _ in range(2):
        d.Trainer.watch_actor(trainer, {"actor/saturation": 0.8, "actor/grad_norm": 0.001})
    assert capsys.readouterr().out == ""
    for _ in range(3):
        d.Trainer.watch_actor(trainer, {"actor/saturation": 0.8, "actor/grad_norm": 0.001})
    out = capsys.readouterr().out
    assert out.count("note: the actor looks stuck") == 1 and "When the actor collapses" in out


def test_second_run_resumes_where_the_first_stopped(trained):
    logdir, _, before = trained
    proc = run_cli(*E2E, "--steps", "1000", "--logdir", str(logdir))
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stdout and "600 env steps" in proc.stdout
    after = read_metrics(logdir)
    assert after[:len(before)] == before                # appended, nothing rewritten
    new_steps = [m["step"] for m in after[len(before):] if "train/return" in m]
    assert new_steps == [800, 1000]
    assert len(list((logdir / "episodes").glob("*.npz"))) == 5
    # Same command again: nothing left to do, nothing changes.
    again = run_cli(*E2E, "--steps", "1000", "--logdir", str(logdir))
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert read_metrics(logdir) == after


def test_a_run_under_a_replay_capacity_resumes_with_the_newest_episodes_that_fit(tmp_path):
    """--replay_capacity 400 holds two of E2E's 200-step episodes. A run stopped at 600 env
    steps (3 episodes written) resumes holding the newest two, read back from their files, and
    counting all three; it goes on with the counters of an unbroken run and keeps every file."""
    logdir, cap = tmp_path / "run", ["--replay_capacity", "400"]
    first = run_cli(*E2E, *cap, "--steps", "600", "--logdir", str(logdir))
    assert first.returncode == 0, first.stderr
    assert "replay: 0.00 GB in memory by --steps 600 (6.15 GB per 10⁶ env steps; " \
           "--replay_capacity 400 env steps)" in first.stdout
    cfg, _ = d.parse_args([*E2E, *cap, "--steps", "1000"])
    trainer = d.Trainer(cfg, "reacher_easy", logdir, "cpu")
    try:
        replay = trainer.replay
        assert replay.num_episodes == 3 and replay.lengths == [100] * 3
        assert trainer.env_steps() == 600 and trainer.counters["updates"] == 10
        assert len(replay.episodes) == 2 and replay.in_memory == 200
        for episode, name in zip(replay.episodes, ["000001.npz", "000002.npz"]):
            with np.load(logdir / "episodes" / name) as data:
                assert all(np.array_equal(episode[k], data[k]) for k in episode)
    finally:
        trainer.lock.close()
    resumed = run_cli(*E2E, *cap, "--steps", "1000", "--logdir", str(logdir))
    assert resumed.returncode == 0, resumed.stderr
    assert "600 env steps, 3 episodes (2 in memory: --replay_capacity 400), 10 updates" \
        in resumed.stdout
    assert "done: 1000 env steps, 20 updates" in resumed.stdout     # 4 phases × 5, as unbroken
    assert [m["step"] for m in read_metrics(logdir) if "train/return" in m] == \
        [200, 400, 600, 800, 1000]
    assert len(list((logdir / "episodes").glob("*.npz"))) == 5      # every file kept


def test_out_of_memory_while_loading_the_replay_blames_no_file(trained, tmp_path, monkeypatch,
                                                               capsys):
    """An allocation failure while reading the episodes back is out of memory, exit 1, with the
    capacity flag to turn; no episode file is called bad or moved, and nothing changes."""
    logdir = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(trained[0]), str(logdir)], check=True)
    before = files_of(logdir)
    load = np.load

    def short_of_memory(path, *args, **kwargs):
        if Path(path).name == "000002.npz":
            raise MemoryError("Unable to allocate 5.87 MiB for an array with shape (6156288,)")
        return load(path, *args, **kwargs)
    monkeypatch.setattr(np, "load", short_of_memory)
    assert d.main([*E2E, "--steps", "1200", "--logdir", str(logdir)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dreamer.py: error: out of memory while loading the replay from "
                          f"{logdir} (MemoryError: Unable to allocate") and "\n" not in err
    assert "every file is intact" in err and "--replay_capacity" in err
    assert "cannot read episode file" not in err and "move it" not in err
    assert files_of(logdir) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rng_states_survive_a_checkpoint_loaded_onto_the_gpu(tmp_path):
    # A checkpoint is loaded with map_location=cuda, which moves the saved RNG ByteTensors to
    # the GPU; resuming a GPU run failed on that until set_rng_states moved them back.
    states = d.rng_states()
    torch.save(states, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", map_location="cuda", weights_only=False)
    assert loaded["torch"].device.type == "cuda"
    d.set_rng_states(loaded)
    assert torch.equal(torch.get_rng_state(), states["torch"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_run_trains_resumes_and_evaluates_on_the_gpu(tmp_path):
    # The end-to-end tests above run on the CPU (bitwise repeatable); this one is the GPU's path.
    gpu = [*E2E, "--device", "cuda", "--logdir", str(tmp_path / "run")]   # the last --device wins
    for steps in ("400", "600"):
        proc = run_cli(*gpu, "--steps", steps)
        assert proc.returncode == 0 and "device cuda" in proc.stdout, proc.stderr
    assert "resuming from" in proc.stdout
    assert [m["step"] for m in read_metrics(tmp_path / "run") if "train/return" in m] == \
        [200, 400, 600]
    proc = run_cli("--evaluate", str(tmp_path / "run"), "--eval_episodes", "1", "--device", "cuda")
    assert proc.returncode == 0 and len(json.loads(proc.stdout.splitlines()[-1])["returns"]) == 1


def test_same_seed_gives_same_first_losses(trained, tmp_path):
    _, _, metrics = trained
    proc = run_cli(*E2E, "--steps", "400", "--logdir", str(tmp_path / "again"))
    assert proc.returncode == 0, proc.stderr
    first = lambda ms: next(m for m in ms if "model/loss" in m)
    a, b = first(metrics), first(read_metrics(tmp_path / "again"))
    for key in ("model/loss", "model/kl", "actor/loss", "value/loss"):
        assert a[key] == b[key], key
    assert [m.get("train/return") for m in metrics[:2]] == \
        [m.get("train/return") for m in read_metrics(tmp_path / "again")[:2]]


def test_evaluate_runs_the_checkpoints_policy_mode_and_writes_nothing(trained, monkeypatch):
    logdir = trained[0]
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in logdir.rglob("*")}
    proc = run_cli("--evaluate", str(logdir), "--eval_episodes", "2", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert len(result["returns"]) == 2 and sum(s.startswith("  episode ") for s in lines) == 2
    assert result["mean"] == pytest.approx(np.mean(result["returns"]))
    checkpoint = torch.load(logdir / "checkpoint.pt", weights_only=False)
    assert result["updates"] == checkpoint["counters"]["updates"]
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in logdir.rglob("*")} == before
    # In this process, with spies: the checkpoint's actor and world model act, every action is
    # the policy's mode (explore=False), the episodes come from seed + 20,000, and a second
    # evaluation repeats the first action for action.
    seeds, agents, steps, act, make_env = [], [], [], d.Dreamer.act, d.make_env

    def spy_make_env(*a, seed, **k):
        seeds.append(seed)
        return make_env(*a, seed=seed, **k)

    def spy_act(self, obs, state, explore):
        agents.append(self)
        action, state = act(self, obs, state, explore)
        steps.append((explore, action.copy()))
        return action, state

    monkeypatch.setattr(d, "make_env", spy_make_env)
    monkeypatch.setattr(d.Dreamer, "act", spy_act)
    assert d.evaluate_run(logdir, 2) == result["returns"]
    first, steps[:] = list(steps), []
    assert d.evaluate_run(logdir, 2) == result["returns"]
    assert len(first) == len(steps) == 200                      # 2 episodes × 100 agent steps
    assert not any(explore for explore, _ in first + steps)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(first, steps))
    assert seeds == [3 + 20_000] * 2
    for name in ("actor", "world_model"):
        mine = getattr(agents[0], name).state_dict()
        assert all(torch.equal(mine[k], v) for k, v in checkpoint[name].items())


def test_evaluate_refuses_a_missing_run_and_flags_it_would_ignore(capsys):
    for argv, message in [(["--evaluate", "no/such/run"], "cannot load the run in no/such/run"),
                          (["--evaluate", ""], "--evaluate needs a run folder"),
                          (["--evaluate", "r", "--seed", "1", "--env", "cartpole_swingup"],
                           "(the run's config.json decides the rest), not --env --seed"),
                          (["--evaluate", "r", "--benchmark"], "not --benchmark")]:
        assert d.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dreamer.py: error:") and message in err and "\n" not in err, err


def test_corrupt_checkpoint_and_episode_give_clear_error_and_destroy_nothing(trained, tmp_path):
    logdir = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(trained[0]), str(logdir)], check=True)
    (logdir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    before = {p: p.read_bytes() for p in logdir.rglob("*") if p.is_file()}
    proc = run_cli(*E2E, "--steps", "2000", "--logdir", str(logdir))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("dreamer.py: error: cannot read checkpoint")
    assert {p: p.read_bytes() for p in logdir.rglob("*") if p.is_file()} == before
    # A damaged episode file, with a readable checkpoint.
    subprocess.run(["cp", str(trained[0] / "checkpoint.pt"), str(logdir)], check=True)
    (logdir / "episodes" / "000001.npz").write_bytes(b"garbage")
    assert d.main([*E2E, "--steps", "2000", "--logdir", str(logdir)]) == 2
    # A different configuration on the same logdir is refused, not mixed in.
    assert d.main([*E2E, "--steps", "2000", "--batch_size", "4", "--logdir", str(logdir)]) == 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])   # Ctrl-C, a job scheduler
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(sig, tmp_path):
    logdir = tmp_path / "run"
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    proc = subprocess.Popen([sys.executable, str(DREAMER_FILE), *E2E, "--steps", "100000",
                             "--logdir", str(logdir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=HERE)
    deadline = time.time() + 120
    while time.time() < deadline and not (logdir / "episodes" / "000001.npz").exists():
        time.sleep(0.2)
    if sig == signal.SIGINT:   # meanwhile, a second run on the same logdir is refused
        second = run_cli(*E2E, "--steps", "100000", "--logdir", str(logdir))
        assert second.returncode == 2 and "is in use by another run" in second.stderr
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err          # 130 for Ctrl-C, 143 for SIGTERM
    assert "Traceback" not in err and "checkpoint saved" in err
    assert (logdir / "checkpoint.pt").exists()
    reached = max(m["step"] for m in read_metrics(logdir))      # (a busy machine runs further)
    resumed = run_cli(*E2E, "--steps", str(reached + 400), "--logdir", str(logdir))
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr


def test_an_ablation_trains_its_arms_side_by_side_and_plot_draws_them(tmp_path):
    """--ablation value: one run per arm (V_λ, V_R) in ROOT/ARM-sSEED with the other flags
    unchanged, output lines tagged with the arm; plot.py ROOT draws both arms in one figure."""
    root = tmp_path / "ablation"
    proc = run_cli(*E2E, "--steps", "600", "--ablation", "value", "--logdir", str(root))
    assert proc.returncode == 0, proc.stdout[-2000:]
    for arm in ("lambda", "reward"):
        config = json.loads((root / f"{arm}-s3" / "config.json").read_text())
        assert (config["value_estimate"], config["time_limit"], config["seed"]) == (arm, 200, 3)
        assert any(line.startswith(f"[{arm}] step      600") for line in proc.stdout.splitlines())
        assert "eval/return" in read_metrics(root / f"{arm}-s3")[-1]
    drawn = subprocess.run([sys.executable, str(HERE / "plot.py"), str(root)],
                           capture_output=True, text=True, timeout=120, cwd=HERE)
    assert drawn.returncode == 0, drawn.stderr
    assert (root / "curves.png").exists()
    assert re.search(r"^lambda: eval/return .* at 600 env steps \(seeds 3\)$", drawn.stdout, re.M)
    assert re.search(r"^reward: eval/return", drawn.stdout, re.M)


def test_ctrl_c_reaches_every_arm_of_an_ablation_and_each_saves_its_checkpoint(tmp_path):
    root = tmp_path / "ablation"
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    proc = subprocess.Popen([sys.executable, str(DREAMER_FILE), *E2E, "--steps", "100000",
                             "--ablation", "representation", "--logdir", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=HERE)
    arms = ("reconstruction", "contrastive", "reward")
    deadline = time.time() + 180
    while time.time() < deadline and not all(
            (root / f"{arm}-s3" / "episodes" / "000001.npz").exists() for arm in arms):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130 and "Traceback" not in out, out[-2000:]
    for arm in arms:
        assert (root / f"{arm}-s3" / "checkpoint.pt").exists()
        assert f"[{arm}] " in out and f"{arm}: exit status 130" in out


def test_episodes_without_checkpoint_train_fresh_models_on_schedule(trained, tmp_path):
    """A run killed before its first checkpoint leaves episodes only: the next run learns from
    them and owes exactly the training phases the schedule asked for: one per 200 env steps
    from the end of the single seed episode, all due before the next episode."""
    logdir = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(trained[0]), str(logdir)], check=True)
    (logdir / "checkpoint.pt").unlink()
    (logdir / "metrics.jsonl").unlink()
    n = len(list((logdir / "episodes").glob("*.npz")))   # 3, or 5 after the resume test
    proc = run_cli(*E2E, "--steps", str(200 * n + 200), "--logdir", str(logdir))
    assert proc.returncode == 0, proc.stderr
    phases = [m["step"] for m in read_metrics(logdir) if "model/loss" in m]
    assert phases == [200 * n] * n


def test_logdir_from_before_a_new_config_field_still_resumes(trained, tmp_path):
    """Config fields and counters added later take their defaults when an older run resumes."""
    logdir = tmp_path / "old"
    subprocess.run(["cp", "-r", str(trained[0]), str(logdir)], check=True)
    config = json.loads((logdir / "config.json").read_text())
    del config["value_estimate"]
    (logdir / "config.json").write_text(json.dumps(config))
    state = torch.load(logdir / "checkpoint.pt", weights_only=False)
    del state["counters"]["phase_updates"]
    torch.save(state, logdir / "checkpoint.pt")
    n = len(list((logdir / "episodes").glob("*.npz")))
    proc = run_cli(*E2E, "--steps", str(200 * n + 200), "--logdir", str(logdir))
    assert proc.returncode == 0 and "resuming from" in proc.stdout, proc.stderr


# ---------------------------------------------------------------------------------------------
# Faults: divergence, simulator errors, odd settings and hard kills lose nothing and explain
# themselves (one line on stderr, a non-zero status, the logdir readable and resumable)
# ---------------------------------------------------------------------------------------------

def strict_json_lines(path):
    """metrics.jsonl as strict JSON: the bare tokens NaN and Infinity are refused."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines()]


def files_of(logdir):
    return {p.relative_to(logdir): p.read_bytes() for p in Path(logdir).rglob("*") if p.is_file()}


def test_divergence_stops_at_its_update_in_one_line_and_never_acts_with_nan(
        tmp_path, monkeypatch, capsys):
    """The issue's example: learning rates of 10 make the losses non-finite within a few
    updates. The run stops at that very update, names the metric and the cause, exits 1,
    keeps its episode, writes strict JSON, and no NaN action ever reaches MuJoCo."""
    actions, updates, step, train_step = [], [], d.DMCEnv.step, d.Dreamer.train_step

    def spy_step(self, action):
        actions.append(np.asarray(action, np.float64))
        return step(self, action)

    def spy_train_step(self, batch):
        updates.append(train_step(self, batch))
        return updates[-1]

    monkeypatch.setattr(d.DMCEnv, "step", spy_step)
    monkeypatch.setattr(d.Dreamer, "train_step", spy_train_step)
    logdir = tmp_path / "run"
    assert d.main([*E2E, "--steps", "1000", "--model_lr", "10", "--actor_lr", "10",
                   "--value_lr", "10", "--logdir", str(logdir)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    # The first update with a non-finite value, found independently, is the one named, and
    # no update ran after it.
    first = next(i for i, m in enumerate(updates, 1)
                 if not all(torch.isfinite(v).all() for v in m.values()))
    assert first == len(updates)
    name = next(k for k, v in updates[-1].items() if not torch.isfinite(v).all())
    assert err.startswith(f"dreamer.py: error: training diverged at update {first}: {name} is ")
    assert "likely cause: --model_lr 10 is 16,667× the paper's 0.0006" in err
    assert f"kept in {logdir}: 1 episode (no checkpoint yet)" in err
    assert len(actions) == 100 and all(np.isfinite(a).all() for a in actions)
    assert [m["step"] for m in strict_json_lines(logdir / "metrics.jsonl")] == [200]
    assert (logdir / "episodes" / "000000.npz").exists() and not (logdir / "checkpoint.pt").exists()


@pytest.mark.parametrize("where", ["loss", "parameter"])
def test_divergence_after_a_checkpoint_keeps_it_and_every_episode(
        where, trained, tmp_path, monkeypatch, capsys):
    """A NaN that shows in an update's losses (an actor weight set to NaN before update 3) or
    only in the parameters (a value weight set to inf after the phase's last update): either
    way the run stops in that phase and the logdir stays exactly as the last checkpoint left it."""
    logdir = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(trained[0]), str(logdir)], check=True)
    before, calls, train_step = files_of(logdir), [], d.Dreamer.train_step

    def poisoned(self, batch):
        calls.append(1)
        if where == "loss" and len(calls) == 3:
            with torch.no_grad():
                self.actor.net[0].weight[0, 0] = float("nan")
        metrics = train_step(self, batch)
        if where == "parameter" and len(calls) == self.cfg.train_steps:
            with torch.no_grad():
                self.value.net[0].weight[0, 0] = float("inf")
        return metrics

    monkeypatch.setattr(d.Dreamer, "train_step", poisoned)
    assert d.main([*E2E, "--steps", "4000", "--logdir", str(logdir)]) == 1
    err = capsys.readouterr().err.strip()
    expected = {"loss": r"diverged at update \d+: actor/\w+ is nan",
                "parameter": r"diverged by update \d+: parameter value\.net\.0\.weight is "
                             r"not finite"}
    assert re.search(expected[where], err) and "\n" not in err, err
    assert len(calls) == {"loss": 3, "parameter": 5}[where]
    assert f"kept in {logdir}: the last checkpoint at " in err
    after, kept = files_of(logdir), lambda files: {k: v for k, v in files.items()
                                                   if k.suffix in (".pt", ".npz")}
    assert kept(after) == kept(before)
    assert set(before) - set(kept(before)) == {Path("config.json"), Path("metrics.jsonl"),
                                               Path("lock")}
    assert after[Path("metrics.jsonl")].startswith(before[Path("metrics.jsonl")])
    strict_json_lines(logdir / "metrics.jsonl")


def test_simulator_error_mid_run_saves_the_checkpoint_and_resumes(trained, tmp_path, monkeypatch,
                                                                  capsys):
    """MuJoCo's PhysicsError in the middle of an episode: one line, exit 1, the episodes written
    before it are untouched, the checkpoint is saved, and the same command resumes."""
    from dm_control.rl import control
    logdir = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(trained[0]), str(logdir)], check=True)
    episodes = {k: v for k, v in files_of(logdir).items() if k.suffix == ".npz"}
    calls, step = [], control.Environment.step

    def failing(self, action):
        calls.append(1)
        # MuJoCo steps, R = 2 per agent step: 1–200 the next episode, 201–400 the evaluation
        # and checkpoint at its end (a multiple of 400 env steps), 401–600 the episode after
        # (no checkpoint at its end), 601–800 the third: its env step 49.
        if len(calls) == 650:
            raise control.PhysicsError("Physics state is invalid. Warning(s) raised: "
                                       "mjWARN_BADQACC")
        return step(self, action)

    monkeypatch.setattr(control.Environment, "step", failing)
    assert d.main([*E2E, "--steps", "4000", "--logdir", str(logdir)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dreamer.py: error: the simulator failed on reacher_easy at env step 49 "
                          "of an episode (PhysicsError: Physics state is invalid.")
    assert "run the same command to resume" in err and "\n" not in err
    n = len(episodes) + 2                    # two more episodes were finished before it
    assert f"the last checkpoint at {200 * n} env steps and {n} episodes" in err
    after = files_of(logdir)
    assert all(after[k] == v for k, v in episodes.items()) and len(
        [k for k in after if k.suffix == ".npz"]) == n
    assert torch.load(logdir / "checkpoint.pt", weights_only=False)["env_steps"] == 200 * n
    monkeypatch.undo()
    proc = run_cli(*E2E, "--steps", str(200 * n + 200), "--logdir", str(logdir))
    assert proc.returncode == 0 and f"resuming from" in proc.stdout, proc.stderr
    assert f"{200 * n} env steps" in proc.stdout


# Runs dreamer.main in a child that kills itself with SIGKILL at a chosen moment, KILL_AT =
# "what:n": at the n-th call of a function (an env step, an update, an evaluation step), in the
# middle of the n-th write of an episode, a checkpoint or a metrics line ("torn": half of the
# bytes are written), just before the n-th rename of a finished temporary file, or n tenths of
# a second after the training loop starts. The real code runs everywhere else.
KILLER = r"""
import importlib.util, io, json, os, signal, sys, threading
import numpy as np, torch
spec = importlib.util.spec_from_file_location("dreamer", os.environ["DREAMER_FILE"])
d = importlib.util.module_from_spec(spec)
sys.modules["dreamer"] = d
spec.loader.exec_module(d)
what, n = os.environ["KILL_AT"].split(":")
count = [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def due():
    count[0] += 1
    return count[0] == int(n)

def before(owner, name, when=lambda *a, **k: True):
    real = getattr(owner, name)
    def wrapper(*a, **k):
        if when(*a, **k) and due():
            die()
        return real(*a, **k)
    setattr(owner, name, wrapper)

def torn(owner, name, file_arg, when=lambda *a, **k: True):
    real = getattr(owner, name)
    def wrapper(*a, **k):
        if when(*a, **k) and due():
            buffer = io.BytesIO()
            real(*[buffer if i == file_arg else x for i, x in enumerate(a)], **k)
            f = a[file_arg]
            f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
            f.flush()
            die()
        return real(*a, **k)
    setattr(owner, name, wrapper)

def torn_log(self, step, metrics):
    if due():
        with open(self.logdir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}})[:15])
        die()
    real_log(self, step, metrics)

real_log = d.Trainer.log
if what == "time":                     # the clock starts with the training loop
    real_run = d.Trainer.run
    def timed_run(self):
        threading.Timer(int(n) / 10, die).start()
        return real_run(self)
    d.Trainer.run = timed_run
elif what == "env_step":
    before(d.DMCEnv, "step")
elif what == "update":
    before(d.Dreamer, "train_step")
elif what == "eval_step":
    before(d.Dreamer, "act", when=lambda self, obs, state, explore, *rest: not explore)
elif what == "torn_episode":
    torn(np, "savez_compressed", 0)
elif what == "torn_checkpoint":
    torn(torch, "save", 1)
elif what == "torn_metrics":
    d.Trainer.log = torn_log
elif what == "final_eval":
    before(d.Trainer, "evaluate_and_log", when=lambda self, steps: steps >= self.cfg.steps)
elif what == "final_checkpoint":
    torn(torch, "save", 1, when=lambda state, f: state["env_steps"] == 2000)
elif what in ("rename_episode", "rename_checkpoint"):
    suffix = ".npz" if what == "rename_episode" else ".pt"
    before(os, "replace", when=lambda src, dst: str(dst).endswith(suffix))
sys.exit(d.main(sys.argv[1:]))
"""

# (kill point, what it hits) in the order they run, each in a new process that resumes the
# logdir the previous one left: 2,000 env steps = 10 episodes of 100 agent steps, a training
# phase of 5 updates every 200 env steps from 200 on, an evaluation and a checkpoint every 400
# (a checkpoint comes after an episode; an evaluation's env steps count as env_step calls too).
KILLS = [
    ("env_step:50", "collection: the first seed episode, before any episode is written"),
    ("torn_episode:1", "the first episode file, half written"),
    ("rename_episode:1", "the first episode file, written but not yet renamed"),
    ("env_step:150", "collection: the 2nd episode, after a training phase, no checkpoint yet"),
    ("update:3", "an update in the middle of a training phase, on episodes without checkpoint"),
    ("torn_metrics:2", "a metrics line, half written"),
    ("eval_step:30", "an evaluation episode"),
    ("torn_checkpoint:1", "the first checkpoint, half written"),
    ("rename_checkpoint:1", "the first checkpoint, written but not yet renamed"),
    ("update:23", "an update in the phase right after the first checkpoint (1000 env steps)"),
    # From here on each run resumes from that checkpoint and the episodes written since.
    ("env_step:50", "collection: the first episode after the resume"),
    ("torn_metrics:2", "a metrics line, half written, after the checkpoint"),
    ("eval_step:30", "an evaluation owed to the resume"),
    ("update:7", "an update of a phase owed to the resume"),
    ("time:15", "1.5 s into the training loop: wherever the run is"),
    ("final_eval:1", "the final evaluation, every episode written"),
    ("final_checkpoint:1", "the final checkpoint, half written, on the resume that redoes the end"),
]


def test_hard_kills_at_every_kind_of_moment_lose_nothing_and_the_run_finishes(tmp_path):
    """SIGKILL (no handler runs) at each of KILLS, then the same command: no file is ever
    unreadable, no written episode is lost or changed, each resume continues from what is on
    disk, and the last run finishes with exactly the updates and records of an unbroken run."""
    logdir = tmp_path / "run"
    argv = [*E2E, "--steps", "2000", "--logdir", str(logdir)]
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"),
           "DREAMER_FILE": str(DREAMER_FILE)}
    episodes, resumed = {}, 0
    for kill, moment in KILLS:
        resumes = (logdir / "checkpoint.pt").exists()
        proc = subprocess.run([sys.executable, "-c", KILLER, *argv], capture_output=True,
                              text=True, timeout=300, env={**env, "KILL_AT": kill}, cwd=HERE)
        assert proc.returncode == -signal.SIGKILL, (kill, moment, proc.stdout, proc.stderr)
        if resumes:    # from the checkpoint and every episode on disk
            assert f"resuming from {logdir / 'checkpoint.pt'}: {200 * len(episodes)} env steps, " \
                   f"{len(episodes)} episodes" in proc.stdout, (kill, proc.stdout)
            resumed += 1
        # Every file is whole: episodes, checkpoint and config load; no episode is lost.
        files = files_of(logdir)
        for path, data in episodes.items():
            assert files[path] == data, (kill, path)
        for path in (logdir / "episodes").glob("*.npz"):
            with np.load(path) as ep:
                assert ep["obs"].shape == (101, 3, 64, 64), (kill, path)
            episodes[path.relative_to(logdir)] = files[path.relative_to(logdir)]
        if (logdir / "checkpoint.pt").exists():
            torch.load(logdir / "checkpoint.pt", weights_only=False)
        json.loads((logdir / "config.json").read_text())
        path = logdir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        if kill.startswith("torn_metrics"):    # the line cut in half; the resume drops it
            assert not lines[-1].endswith("}")
            lines = lines[:-1]
        for line in lines:
            json.loads(line)
    assert resumed == 7                      # the runs after "update:23" found a checkpoint
    final = run_cli(*argv)
    assert final.returncode == 0, final.stderr
    assert "done: 2000 env steps, 45 updates" in final.stdout     # 9 phases × 5, none twice
    assert sorted(p.name for p in (logdir / "episodes").glob("*.npz")) == \
        [f"{i:06d}.npz" for i in range(10)]
    assert not list(logdir.rglob("*.tmp"))
    metrics = strict_json_lines(logdir / "metrics.jsonl")
    assert [m["step"] for m in metrics if "train/return" in m] == list(range(200, 2001, 200))
    assert len([m for m in metrics if "model/loss" in m]) == 9
    steps = [m["step"] for m in metrics]
    assert steps == sorted(steps)
    state = torch.load(logdir / "checkpoint.pt", weights_only=False)
    assert state["counters"]["updates"] == 45 and state["env_steps"] == 2000
    # Temporary files that no later write reuses are removed too; a finished run changes nothing.
    before = files_of(logdir)
    for stale in ("checkpoint.pt.tmp", "episodes/000010.npz.tmp"):
        (logdir / stale).write_bytes(b"left by a kill")
    again = run_cli(*argv)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert files_of(logdir) == before


def test_metrics_lines_are_strict_json_even_for_a_non_finite_value(tmp_path):
    trainer = object.__new__(d.Trainer)             # log() needs only the logdir
    trainer.logdir = tmp_path
    trainer.log(7, {"a": torch.tensor(float("nan")), "b": float("inf"), "c": 1.5})
    assert strict_json_lines(tmp_path / "metrics.jsonl") == [
        {"step": 7, "a": None, "b": None, "c": 1.5}]


def test_out_of_memory_is_one_line(capsys, tmp_path):
    # 10¹² units: the first weight matrix alone asks for 160 TB, refused at once.
    assert d.main([*E2E, "--units", "1000000000000", "--logdir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dreamer.py: error: out of memory") and "\n" not in err


def test_an_environment_that_cannot_be_set_up_is_one_line(monkeypatch):
    """A simulator that fails to start (here: the error dm_control raises when EGL finds no
    device) becomes a UserError naming the task, for training, --evaluate and plot.py alike."""
    def broken(*args, **kwargs):
        raise ImportError("Cannot initialize a EGL device display")
    monkeypatch.setattr(d, "DMCEnv", broken)
    with pytest.raises(d.UserError, match="cannot create the environment reacher_easy "
                                          r"\(ImportError: Cannot initialize"):
        d.make_env("reacher_easy")


def test_a_logdir_moved_away_during_a_run_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    """Moving or deleting the logdir under a running run: the next write fails, and the line
    says what happened instead of a bare FileNotFoundError."""
    import shutil

    def run(self):
        shutil.move(str(self.logdir), str(tmp_path / "moved"))
        self.log(1000, {"train/return": 0.0})
    monkeypatch.setattr(d.Trainer, "run", run)
    logdir = tmp_path / "run"
    assert d.main(["--env", "reacher_easy", "--preset", "tiny", "--device", "cpu",
                   "--logdir", str(logdir)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dreamer.py: error: the logdir {logdir} was moved or deleted")
    assert "\n" not in err and (tmp_path / "moved" / "config.json").exists()


def tiny_world_model_and_episode(rows):
    """A freshly initialised tiny world model (seed 0) and a replay episode of random images,
    actions in [−1, 1] and rewards with `rows` rows."""
    torch.manual_seed(0)
    wm = d.WorldModel(tiny_config(), action_dim=2)
    rng = np.random.default_rng(0)
    return wm, {"obs": rng.integers(0, 256, (rows, 3, 64, 64), dtype=np.uint8),
                "action": rng.uniform(-1, 1, (rows, 2)).astype(np.float32),
                "reward": rng.normal(size=rows).astype(np.float32)}


def test_open_loop_sees_images_only_in_its_context():
    """The first C rows are filtered with the images; the rest are predicted from actions
    alone: changing a later image changes nothing, changing a context image changes them."""
    wm, episode = tiny_world_model_and_episode(rows=30)

    def run(ep):
        torch.manual_seed(1)
        return d.open_loop(wm, ep, start=2, length=20, context=5)

    base = run(episode)
    assert base["model"].shape == (20, 3, 64, 64) and base["model"].dtype == np.uint8
    assert np.array_equal(base["obs"], episode["obs"][2:22])
    assert base["reward_pred"].shape == (20,)
    later = {**episode, "obs": episode["obs"].copy()}
    later["obs"][10:] = 0                                    # rows 8+ of the chunk: not seen
    out = run(later)
    assert np.array_equal(out["model"], base["model"])
    assert np.array_equal(out["reward_pred"], base["reward_pred"])
    early = {**episode, "obs": episode["obs"].copy()}
    early["obs"][4] = 255 - early["obs"][4]                  # row 2 of the chunk: in context
    out = run(early)
    assert not np.array_equal(out["model"][5:], base["model"][5:])
    # The reconstructions are the decoded posterior states of RSSM.observe (same noise).
    torch.manual_seed(1)
    s = wm.rssm.observe(wm.encoder(d.preprocess(torch.as_tensor(episode["obs"][None, 2:7]))),
                        torch.as_tensor(episode["action"][None, 2:7]))
    with torch.no_grad():
        rec = wm.decoder(torch.cat([s["z"], s["h"]], -1))[0]
    rec = ((rec + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    assert np.abs(rec.astype(int) - base["model"][:5].astype(int)).max() <= 1


def test_prediction_error_is_the_mse_of_open_loop_and_filtered_images_per_horizon(monkeypatch):
    """Written out by hand, chunk by chunk and step by step: the filtered states see every
    image (RSSM.observe), the open-loop ones only the first C and then the actions
    (RSSM.imagine_step); with the noise ε set to 0 the order of the draws does not matter."""
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    wm, episode = tiny_world_model_and_episode(rows=17)
    C, H = 3, 6                                        # chunks of 9 rows start at 0, 4 and 8
    got = d.prediction_error(wm, [episode], horizon=H, context=C, stride=4)
    assert got["chunks"] == 3
    errors = {k: np.zeros(H) for k in ("image_open", "image_filtered", "reward_open",
                                         "reward_filtered")}
    with torch.no_grad():
        for start in (0, 4, 8):
            obs = torch.as_tensor(episode["obs"][start:start + C + H])
            action = torch.as_tensor(episode["action"][start:start + C + H])
            reward = episode["reward"][start:start + C + H]
            s = wm.rssm.observe(wm.encoder(d.preprocess(obs[None])), action[None])
            z, h = s["z"][0, C - 1:C], s["h"][0, C - 1:C]
            for k in range(1, H + 1):
                t = C - 1 + k                          # the row k steps after the last seen one
                z, h = wm.rssm.imagine_step(z, h, action[None, t])
                real = obs[t].float() / 255 - 0.5
                for kind, feat in (("open", torch.cat([z, h], -1)[0]),
                                   ("filtered", torch.cat([s["z"][0, t], s["h"][0, t]], -1))):
                    image = wm.decoder(feat[None])[0]
                    errors[f"image_{kind}"][k - 1] += float(((image - real) ** 2).mean()) / 3
                    errors[f"reward_{kind}"][k - 1] += abs(float(wm.reward(feat)) - reward[t]) / 3
    for key, expected in errors.items():
        np.testing.assert_allclose(got[key], expected, rtol=1e-4, err_msg=key)
    assert not np.allclose(got["image_open"], got["image_filtered"])
    with pytest.raises(d.UserError, match="rows"):
        d.prediction_error(wm, [episode], horizon=15, context=5)


def test_headless_rendering_is_chosen_only_where_it_applies():
    assert d.headless_gl({}, "linux") == "egl"                          # a server, CI
    assert d.headless_gl({"DISPLAY": ":0"}, "linux") == "egl"           # same pixels on a desktop
    assert d.headless_gl({}, "darwin") is None and d.headless_gl({}, "win32") is None
    assert d.headless_gl({"MUJOCO_GL": "osmesa"}, "linux") is None      # the user's choice wins


def test_an_exported_agent_is_weights_only_and_plays(trained, tmp_path):
    logdir = trained[0]
    out = tmp_path / "agent"
    d.export_agent(logdir, out)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json",
                                                      "metrics.jsonl"]
    assert (out / "metrics.jsonl").read_bytes() == (logdir / "metrics.jsonl").read_bytes()
    state = torch.load(out / "checkpoint.pt", weights_only=True)         # no pickled objects
    assert set(state) == {"world_model", "actor", "value", "counters", "last"}
    assert (out / "checkpoint.pt").stat().st_size < 0.3 * (logdir / "checkpoint.pt").stat().st_size
    _, _, agent, _ = d.load_agent(out)
    _, _, reference, _ = d.load_agent(logdir)
    for name, module in reference.modules().items():
        mine = agent.modules()[name].state_dict()
        for key, value in module.state_dict().items():
            assert mine[key].dtype == value.dtype
            assert torch.equal(mine[key], value.half().to(value.dtype)), (name, key)
    assert len(d.evaluate_run(out, 1)) == 1
    with pytest.raises(d.UserError, match="already holds a checkpoint"):
        d.export_agent(logdir, out)
    with pytest.raises(d.UserError, match="cannot load the run"):
        d.export_agent(tmp_path / "nothing", tmp_path / "other")


def run_plot(*args):
    return subprocess.run([sys.executable, str(HERE / "plot.py"), *args], capture_output=True,
                          text=True, timeout=300, cwd=HERE,
                          env={**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")})


def test_plot_draws_curves_and_open_loop_and_refuses_a_bare_folder(trained, tmp_path):
    logdir = trained[0]
    for extra, name in ([], "curves.png"), (["--openloop"], "openloop.png"):
        proc = run_plot(str(logdir), *extra, "--out", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "openloop-error.png").read_bytes()[:4] == b"\x89PNG"
    table = [line.split() for line in proc.stdout.splitlines() if re.match(r"\s+\d+ \|", line)]
    assert [int(row[0]) for row in table] == [1, 2, 5, 10, 15, 20, 30, 45]
    assert all(float(row[2]) >= 0 and float(row[3]) >= 0 for row in table)
    proc = run_plot(str(tmp_path), "--openloop")
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert err.startswith("plot.py: error:") and "\n" not in err


def test_plot_video_shows_real_model_and_error_frames(trained, tmp_path, capsys):
    """plot.py --video, in-process: one GIF frame per agent step of whole 50-step chunks, each
    frame the real image, the model's and their difference, side by side at twice the size."""
    import plot
    from PIL import Image
    logdir = trained[0]
    plot.main([str(logdir), "--video", "--out", str(tmp_path / "v.gif")])
    with Image.open(tmp_path / "v.gif") as gif:
        assert gif.n_frames == 100                      # 101 rows: two chunks of 50
        assert gif.size == (2 * (3 * 64 + 2 * 4), 2 * 64 + 28)
    assert "100 frames of an episode whose whole return is" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--length needs --openloop or --video"):
        plot.main([str(logdir), "--length", "60"])
    plot.main([str(logdir), "--video", "--episode", "0", "--length", "60",
               "--out", str(tmp_path / "r.gif")])
    with Image.open(tmp_path / "r.gif") as gif:
        assert gif.n_frames == 50
        gif.seek(0)
        frame = np.asarray(gif.convert("RGB"))
    real = np.load(logdir / "episodes" / "000000.npz")["obs"][0].transpose(1, 2, 0)
    shown = frame[28::2, :128:2][:64, :64]               # the left panel, at its own size
    assert np.abs(shown.astype(int) - real.astype(int)).mean() < 8   # up to the GIF's palette
    for argv, message in [(["--episode", "99"], "episode files"),
                          (["--length", "10"], "at least 50"),
                          (["--episodes", "0"], "--episodes must be"),
                          (["--start", "3"], "--start does nothing here"),
                          (["--episode", "0", "--episodes", "2"], "--episodes does nothing"),
                          (["--openloop"], "separate commands")]:
        with pytest.raises(SystemExit, match=message):
            plot.main([str(logdir), "--video", *argv, "--out", str(tmp_path / "x.gif")])


# ---------------------------------------------------------------------------------------------
# Exercises: python dreamer.py --make-exercise NAMES --out FILE, graded by these same tests
# ---------------------------------------------------------------------------------------------

EXERCISES = ["rssm_prior", "rssm_posterior", "onehot_actor", "epsilon_greedy", "reward_sum", "nstep_return",
             "lambda_return", "contrastive_log_likelihood", "world_model_loss", "imagine",
             "actor_loss", "value_loss", "replay_sample"]


def without_bodies(lines):
    found = d.find_exercises(lines)
    cut = {i for start, end, _, _ in found.values() for i in range(start + 1, end)}
    return [line for i, line in enumerate(lines) if i not in cut], found


def test_make_exercise_cuts_only_the_marked_bodies(tmp_path, capsys):
    """The student copy differs from the reference only inside the marked bodies, each of which
    is one raise naming the exercise and its hint; it imports, and the cut piece raises."""
    reference = DREAMER_FILE.read_text().splitlines()
    rest, found = without_bodies(reference)
    assert list(found) == EXERCISES
    student = tmp_path / "student" / "dreamer.py"
    assert d.main(["--make-exercise", "all", "--out", str(student)]) == 0
    assert f"grade: DREAMER_FILE={student}" in capsys.readouterr().out
    lines = student.read_text().splitlines()
    student_rest, student_found = without_bodies(lines)
    assert student_rest == rest                        # putting the bodies back gives dreamer.py
    for name, (start, end, indent, hint) in student_found.items():
        assert end == start + 2 and lines[start + 1] == (
            f"{indent}raise NotImplementedError({repr(f'Exercise {name}: {hint}')})")
    spec = importlib.util.spec_from_file_location("student_dreamer", student)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)                      # everything else still imports
    with pytest.raises(NotImplementedError, match="Exercise lambda_return: scan"):
        copy.lambda_return(torch.zeros(3), torch.zeros(3), torch.ones(3), torch.zeros(()), 0.9)
    assert d.main(["--make-exercise", "lambda_return,nope", "--out", str(student)]) == 2
    assert d.main(["--make-exercise", "all", "--out", str(DREAMER_FILE)]) == 2
    assert d.main(["--make-exercise", "list"]) == 0
    assert capsys.readouterr().out.split()[::1][:1] == ["rssm_prior"]


# Numbered ids, so that `-k NAME` selects the piece's graders and never this test.
@pytest.mark.parametrize("name", EXERCISES, ids=[f"piece{i}" for i in range(len(EXERCISES))])
def test_each_exercise_fails_its_graders_until_its_body_is_back(name, tmp_path):
    """`DREAMER_FILE=copy pytest -k NAME` on a copy with only NAME cut: the graders exist and
    every one of them fails (the reference passes them in this very suite)."""
    student = tmp_path / "dreamer.py"
    d.make_exercise([name], student, source=DREAMER_FILE)
    graders = [t for t in globals() if t.startswith("test_") and name in t]
    assert graders, f"no test is named after exercise {name}"
    report = tmp_path / "report.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(Path(__file__)),
                           "-k", f"{name} and not make_exercise and not each_exercise",
                           f"--junitxml={report}"],
                          capture_output=True, text=True, timeout=600, cwd=HERE,
                          env={**os.environ, "DREAMER_FILE": str(student)})
    import xml.etree.ElementTree as ET
    cases = ET.parse(report).getroot().iter("testcase")
    outcomes = {c.get("name"): [x.tag for x in c] for c in cases}
    assert outcomes and proc.returncode == 1, proc.stdout[-2000:]
    passed = [t for t, tags in outcomes.items() if not {"failure", "error", "skipped"} & set(tags)]
    assert not passed, f"graders of {name} that pass without it: {passed}"


# ---------------------------------------------------------------------------------------------
# Not in the paper: state vectors (--obs state) and your own environment (--env gym:ID)
# ---------------------------------------------------------------------------------------------

def state_config(**overrides):
    return tiny_config(obs="state", **overrides)


def test_dense_encoder_and_decoder_shapes_and_j_o_is_the_gaussian_log_likelihood():
    """J_O for a state vector is ln N(o_t; ô_t, I) summed over its O entries (without the
    constant), averaged over B·L, as for images; with symlog the encoder reads, and the decoder
    predicts, symlog(o)."""
    B, L, O = 3, 6, 5
    g = torch.Generator().manual_seed(1)
    batch = {"obs": torch.randn(B, L, O, generator=g) * 4, "action": torch.rand(B, L, 2) * 2 - 1,
             "reward": torch.randn(B, L, generator=g)}
    for transform in ("none", "symlog"):
        cfg = state_config(state_transform=transform)
        wm = d.WorldModel(cfg, 2, obs_shape=(O,))
        assert isinstance(wm.encoder, d.DenseEncoder) and isinstance(wm.decoder, d.DenseDecoder)
        assert wm.encoder(batch["obs"]).shape == (B, L, cfg.units)
        feat = torch.randn(B, L, cfg.stoch_size + cfg.deter_size)
        assert wm.decoder(feat).shape == (B, L, O)
        seen, mean = [], torch.randn(B, L, O, generator=g)
        encode = wm.encoder.forward
        wm.encoder.forward = lambda x: (seen.append(x), encode(x))[1]
        wm.decoder.forward = lambda feat: mean
        _, metrics, _, _ = d.world_model_loss(wm, batch, cfg)
        o = batch["obs"].double()
        target = torch.sign(o) * torch.log1p(o.abs()) if transform == "symlog" else o
        torch.testing.assert_close(seen[0].double(), target)
        log_lik = torch.distributions.Normal(mean.double(), 1.0).log_prob(target) \
            + 0.5 * math.log(2 * math.pi)
        expected = -log_lik.sum() / (B * L)
        assert metrics["model/image_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_state_world_model_learns_and_the_pixel_one_is_unchanged():
    """--obs state swaps only the encoder and decoder: RSSM, reward model, actor and value model
    have the parameter counts of the pixel agent at the same sizes."""
    pixel, state = d.Dreamer(tiny_config(), 2), d.Dreamer(state_config(), 2, obs_shape=(6,))
    for part in ("actor", "value"):
        assert d.count_parameters(getattr(pixel, part)) == d.count_parameters(getattr(state, part))
    wp, ws = pixel.world_model, state.world_model
    assert d.count_parameters(wp.reward) == d.count_parameters(ws.reward)
    assert d.count_parameters(ws.rssm) == d.count_parameters(d.RSSM(tiny_config(), 2, tiny_config().units))
    assert isinstance(wp.encoder, d.Encoder) and isinstance(wp.decoder, d.Decoder)
    with pytest.raises(ValueError, match="does not fit"):
        d.WorldModel(state_config(), 2, obs_shape=(3, 64, 64))


def test_dmc_state_is_the_observation_dict_flattened_in_spec_order_and_nothing_is_rendered():
    from dm_control import suite
    env = d.make_env("reacher_easy", time_limit=20, seed=5, obs="state")
    env.render = lambda: pytest.fail("state mode must not render")
    twin = suite.load("reacher", "easy", task_kwargs={"random": 5})
    assert list(twin.observation_spec()) == ["position", "to_target", "velocity"]
    obs, ts = env.reset(), twin.reset()
    flat = lambda ts: np.concatenate([ts.observation[k] for k in ("position", "to_target",
                                                                  "velocity")])
    assert obs.dtype == np.float32 and obs.shape == (6,) == env.obs_shape
    np.testing.assert_allclose(obs, flat(ts), rtol=1e-6)
    action = np.array([0.3, -0.7])
    obs, reward, done, terminal = env.step(action)
    ts2 = twin.step(action), twin.step(action)
    np.testing.assert_allclose(obs, flat(ts2[1]), rtol=1e-6)
    assert reward == pytest.approx(ts2[0].reward + ts2[1].reward) and not terminal
    cartpole = d.make_env("cartpole_swingup", obs="state")
    assert cartpole.obs_shape == (5,)                    # position 3, velocity 2


# A user's own Gymnasium environments, in a module of their own (registered on import).
USER_ENVS = '''
import gymnasium as gym
import numpy as np

class Line(gym.Env):
    """A point on a line: ends (terminated) past |x| > 2; the time limit truncates."""
    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = gym.spaces.Box(np.array([-2.0, 0.0], np.float32),
                                  np.array([2.0, 10.0], np.float32))
    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, render_mode=None, push=0.0):
        self.render_mode, self.push, self.received = render_mode, push, []

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.x = float(self.np_random.uniform(-0.5, 0.5))
        return np.array([self.x, 0.0], np.float32), {}

    def step(self, action):
        self.received.append(np.array(action))
        self.x += 0.1 * float(action[0]) + self.push
        return (np.array([self.x, 1.0], np.float32), -abs(self.x), abs(self.x) > 2, False, {})

    def render(self):
        image = np.zeros((32, 32, 3), np.uint8)
        image[:, int(np.clip(8 * (self.x + 2), 0, 31))] = 255
        return image

class Coins(gym.Env):
    observation_space = gym.spaces.Dict({"a": gym.spaces.Box(0, 1, (2,))})
    action_space = gym.spaces.Discrete(3)

class Seven(Line):
    """Ends (terminated) after exactly 7 env steps: inside an action repeat of 2."""

    def reset(self, seed=None, options=None):
        self.t = 0
        return super().reset(seed=seed)

    def step(self, action):
        self.t += 1
        obs, reward, _, _, info = super().step(action)
        return obs, reward, self.t == 7, False, info

gym.register(id="Line-v0", entry_point="dreamer_user_envs:Line", max_episode_steps=40)
gym.register(id="Seven-v0", entry_point="dreamer_user_envs:Seven", max_episode_steps=40)
gym.register(id="Push-v0", entry_point="dreamer_user_envs:Line", max_episode_steps=40,
             kwargs={"push": 0.2})
gym.register(id="Endless-v0", entry_point="dreamer_user_envs:Line")
gym.register(id="Coins-v0", entry_point="dreamer_user_envs:Coins", max_episode_steps=400)
'''


@pytest.fixture
def user_envs(tmp_path, monkeypatch):
    (tmp_path / "dreamer_user_envs.py").write_text(USER_ENVS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_gym_box_actions_are_scaled_onto_the_bounds_and_terminated_is_terminal(user_envs):
    env = d.make_env("gym:dreamer_user_envs:Line-v0", action_repeat=1, time_limit=40, seed=0,
                     obs="state")
    assert env.obs_shape == (2,) and env.action_dim == 2 and not env.discrete
    env.reset()
    for action, expected in ([-1, 1], [-2, 10]), ([1, -1], [2, 0]), ([0, 0], [0, 5]):
        env.step(np.array(action, np.float64))
        np.testing.assert_allclose(env.env.unwrapped.received[-1], expected)
    push = d.make_env("gym:dreamer_user_envs:Push-v0", action_repeat=2, time_limit=40, seed=0,
                      obs="state")
    push.reset()
    results = [push.step(np.zeros(2))]
    while not results[-1][2]:
        results.append(push.step(np.zeros(2)))
    assert results[-1][3] and not any(r[3] for r in results[:-1])    # terminated: terminal
    line = d.make_env("gym:dreamer_user_envs:Line-v0", action_repeat=2, time_limit=40, seed=0,
                      obs="state")
    episode, _ = d.run_episode(line, lambda obs, s: (np.array([0.0, -1.0]), None))
    assert len(episode["reward"]) == 21 and not episode["terminal"].any()   # truncated: not
    assert episode["obs"].dtype == np.float32
    pixels = d.make_env("gym:dreamer_user_envs:Line-v0", time_limit=40, obs="pixels")
    assert pixels.reset().shape == (3, 64, 64) and pixels.reset().dtype == np.uint8


def test_env_steps_count_the_steps_really_played(user_envs, tmp_path):
    """An episode that ends inside an action's repeat played fewer env steps than its agent
    steps × R: Seven-v0 ends after 7 (4 actions at R = 2, the last played once). --steps, the
    step axis and train/length count 7 per episode, and a resume reads them back from the files."""
    argv = ["--env", "gym:dreamer_user_envs:Seven-v0", "--obs", "state", "--preset", "tiny",
            "--action_repeat", "2", "--batch_length", "4", "--train_every", "14",
            "--eval_every", "28", "--checkpoint_every", "28", "--logdir", str(tmp_path / "run")]
    assert d.main([*argv, "--steps", "28"]) == 0
    assert d.main([*argv, "--steps", "56"]) == 0
    records = [m for m in read_metrics(tmp_path / "run") if "train/return" in m]
    assert [m["step"] for m in records] == list(range(7, 57, 7))
    assert {m["train/length"] for m in records} == {7}
    with np.load(tmp_path / "run" / "episodes" / "000000.npz") as episode:
        assert int(episode["env_steps"]) == 7 and len(episode["reward"]) == 5


def test_training_phases_fall_due_inside_episodes_every_train_every_env_steps(user_envs,
                                                                              tmp_path):
    """[official code] Train every train_every env steps, inside an episode too: Line-v0's
    40-step episodes with --train_every 10 get a phase (5 updates) at every 10th env step from
    the end of the seed episode on, each logged at its own step, not four at the episode's end.
    A run stopped at 80 and resumed to 120 has the phases of an unbroken one."""
    argv = ["--env", "gym:dreamer_user_envs:Line-v0", "--obs", "state", "--preset", "tiny",
            "--train_every", "10", "--eval_every", "1000", "--logdir", str(tmp_path / "run")]
    assert d.main([*argv, "--steps", "80"]) == 0
    assert d.main([*argv, "--steps", "120"]) == 0
    metrics = read_metrics(tmp_path / "run")
    ends = [m["step"] for m in metrics if "train/return" in m]
    phases = [m["step"] for m in metrics if "model/loss" in m]
    assert phases == list(range(ends[0], ends[-1], 10))              # one per 10 env steps
    assert set(phases) - set(ends)                                   # some inside an episode
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["counters"]["updates"] == 5 * len(phases)
    assert all(m["replay/sampleable"] == 1.0 for m in metrics if "model/loss" in m)


def test_gym_tasks_bring_their_time_limit_and_kind_of_actions(user_envs):
    cfg, args = d.parse_args(["--env", "gym:CartPole-v1", "--obs", "state"])
    assert cfg.time_limit == 500 and cfg.actor_dist == "onehot" and cfg.discount_scale == 10
    assert args.logdir == os.path.join("runs", "gym-CartPole-v1-paper-s0")
    cfg, _ = d.parse_args(["--env", "gym:Pendulum-v1", "--preset", "cpu-state",
                           "--time_limit", "100"])
    assert cfg.time_limit == 100 and cfg.actor_dist == "tanh_normal" and cfg.obs == "state"
    cfg, _ = d.parse_args(["--env", "gym:dreamer_user_envs:Endless-v0", "--obs", "state",
                           "--time_limit", "300"])
    assert cfg.time_limit == 300


GYM_BAD = [
    (["--env", "gym:NoSuchEnv-v0"], "cannot make the Gymnasium environment 'NoSuchEnv-v0'"),
    (["--env", "gym:dreamer_user_envs:Coins-v0", "--obs", "state"], "--obs state needs a Box"),
    (["--env", "gym:CartPole-v1", "--obs", "state", "--actor_dist", "tanh_normal"],
     "the actor must be onehot"),
    (["--env", "gym:Pendulum-v1", "--obs", "state", "--epsilon_start", "0.2"], "ε-greedy"),
    (["--env", "gym:dreamer_user_envs:Endless-v0", "--obs", "state"], "pass --time_limit"),
    (["--env", "atari_pong", "--obs", "state"], "played from pixels"),
    (["--state_transform", "symlog"], "applies to state vectors"),
    (["--obs", "ram"], "--obs must be pixels or state"),
]


@pytest.mark.parametrize("argv,message", GYM_BAD)
def test_gym_and_state_refusals_are_one_line(argv, message, user_envs, capsys):
    assert d.main(argv + ["--logdir", str(user_envs / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dreamer.py: error:") and message in err and "\n" not in err
    assert not (user_envs / "run").exists()


def test_gym_refuses_pixels_without_rgb_array_and_names_a_missing_package(monkeypatch, capsys,
                                                                          tmp_path):
    d.probe_gym.cache_clear()
    real = d.probe_gym("gym:CartPole-v1")
    monkeypatch.setattr(d, "probe_gym", lambda task: {**real, "pixels": False})
    assert d.main(["--env", "gym:CartPole-v1", "--logdir", str(tmp_path / "r")]) == 2
    assert "does not render rgb_array frames" in capsys.readouterr().err
    monkeypatch.undo()
    d.probe_gym.cache_clear()
    monkeypatch.setitem(sys.modules, "gymnasium", None)            # as if not installed
    assert d.main(["--env", "gym:Foo-v0", "--logdir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "need the package gymnasium" in err and "\n" not in err
    d.probe_gym.cache_clear()


GYM_E2E = ["--obs", "state", "--preset", "tiny", "--train_every", "200", "--eval_every", "400",
           "--checkpoint_every", "400", "--seed", "2", "--device", "cpu"]


@pytest.mark.parametrize("task,discrete", [("gym:Pendulum-v1", False), ("gym:CartPole-v1", True)])
def test_gymnasium_trains_end_to_end_continuous_and_discrete(task, discrete, tmp_path):
    logdir = tmp_path / "run"
    proc = run_cli("--env", task, *GYM_E2E, "--steps", "800", "--logdir", str(logdir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = read_metrics(logdir)
    assert any("model/discount_loss" in m for m in metrics) and any("eval/return" in m for m in metrics)
    episode = np.load(sorted((logdir / "episodes").glob("*.npz"))[-1])
    assert episode["obs"].dtype == np.float32 and episode["obs"].shape[1] == (4 if discrete else 3)
    actions = episode["action"][1:]
    if discrete:
        assert set(np.unique(actions)) == {0.0, 1.0} and (actions.sum(1) == 1).all()
    else:
        assert np.abs(actions).max() <= 1
    config = json.loads((logdir / "config.json").read_text())
    assert config["obs"] == "state" and config["actor_dist"] == ("onehot" if discrete else "tanh_normal")


def test_a_users_own_environment_trains_through_the_module_form(user_envs):
    """gym:module:Name, the module in the current folder (not on PYTHONPATH): imported, its
    environment registered and trained, and a run resumes."""
    args = [sys.executable, str(DREAMER_FILE), "--env", "gym:dreamer_user_envs:Line-v0",
            *GYM_E2E, "--steps", "600", "--logdir", "run"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=user_envs, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (user_envs / "run" / "checkpoint.pt").exists()
    again = subprocess.run(args[:-3] + ["900", "--logdir", "run"], capture_output=True,
                           text=True, timeout=300, cwd=user_envs, env=env)
    assert again.returncode == 0 and "resuming from" in again.stdout, again.stderr[-2000:]


def test_readme_own_environment_example_trains(tmp_path):
    """The README's "Your own environment" example, as a reader would copy it."""
    text = (HERE / "README.md").read_text()
    section = text[text.index("## Your own environment"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    name = re.search(r"^# (\w+)\.py", code, re.M).group(1)
    (tmp_path / f"{name}.py").write_text(code)
    command = re.search(r"python dreamer.py (--env gym:\S+ .*)", section).group(1).split()
    proc = subprocess.run([sys.executable, str(DREAMER_FILE), *command, "--preset", "tiny",
                           "--steps", "600", "--train_every", "200", "--logdir", "run"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any("model/loss" in m for m in read_metrics(tmp_path / "run"))


STATE_E2E = [*E2E, "--obs", "state"]


@pytest.fixture(scope="module")
def state_trained(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("state") / "run"
    first = run_cli(*STATE_E2E, "--steps", "600", "--logdir", str(logdir))
    return logdir, first, read_metrics(logdir)


def test_state_run_resumes_evaluates_and_draws(state_trained, tmp_path):
    logdir, first, metrics = state_trained
    assert first.returncode == 0, first.stderr[-2000:]
    assert "encoder 3,392" in first.stdout          # the dense encoder: 6 → 32 → 32 → 32 → 32
    again = run_cli(*STATE_E2E, "--steps", "800", "--logdir", str(logdir))
    assert again.returncode == 0 and "resuming from" in again.stdout, again.stderr[-2000:]
    assert read_metrics(logdir)[:len(metrics)] == metrics
    proc = run_cli("--evaluate", str(logdir), "--eval_episodes", "2")
    assert proc.returncode == 0 and "eval return" in proc.stdout, proc.stderr[-2000:]
    proc = run_plot(str(logdir), "--openloop", "--out", str(tmp_path / "o.png"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "o.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "o-error.png").read_bytes()[:4] == b"\x89PNG"
    assert "state MSE open loop" in proc.stdout


def test_state_open_loop_decodes_states_in_the_environments_units(state_trained):
    _, _, agent, _ = d.load_agent(state_trained[0])
    wm = agent.world_model
    episode = np.load(sorted((state_trained[0] / "episodes").glob("*.npz"))[0])
    r = d.open_loop(wm, {k: episode[k] for k in ("obs", "action", "reward")}, length=20)
    assert r["obs"].shape == r["model"].shape == r["filtered"].shape == (20, 6)
    torch.manual_seed(0)
    filtered, _ = d.filter_and_predict(wm, torch.as_tensor(episode["obs"][None, :20]),
                                       torch.as_tensor(episode["action"][None, :20]), 5)
    torch.manual_seed(0)
    r = d.open_loop(wm, {k: episode[k] for k in ("obs", "action", "reward")}, length=20)
    np.testing.assert_allclose(r["filtered"], wm.decoder(filtered[0]).detach().numpy(), rtol=1e-5)


def test_state_video_shows_rendered_frames_beside_state_curves(state_trained, tmp_path, capsys):
    import plot
    from PIL import Image
    plot.main([str(state_trained[0]), "--video", "--length", "50", "--out", str(tmp_path / "v.gif")])
    with Image.open(tmp_path / "v.gif") as gif:
        assert gif.n_frames == 50 and gif.size[0] > 2 * 64
    with pytest.raises(SystemExit, match="holds no frames"):
        plot.main([str(state_trained[0]), "--video", "--episode", "0", "--out",
                   str(tmp_path / "x.gif")])
