"""Dreamer in one file: Hafner, Lillicrap, Ba, Norouzi, "Dream to Control: Learning Behaviors by
Latent Imagination", ICLR 2020 (arXiv 1912.01603). Read it next to the paper, top to bottom.

    python dreamer.py --env reacher_easy                  # paper defaults (slow on a CPU)
    python dreamer.py --env reacher_easy --preset tiny    # smoke run, under 2 minutes on 2 cores
    python dreamer.py --help                              # every flag, with its paper symbol

Part I is the paper's algorithm and nothing else, by dependency: the configuration; Sec. 4's
world model (encoder, RSSM (Eq. 1), decoder, reward model); Sec. 3's behaviour (actor (Eq. 2, 3),
value model, value estimates (Eq. 4–6)); the losses (Eq. 10, 7, 8); the replay buffer and the
environments; the training loop (Algorithm 1). Part II, after it, holds what the paper does not
have, each under its own banner: options beyond the paper, speed, diagnostics, the machinery of
a run (checkpoints, resume, faults), benchmark, ablations, exercises, checks and main().
Where the paper leaves a detail open we follow the authors' TF2 code (github.com/danijar/dreamer)
and say so with the tag [official code]; README.md lists every such place. [paper's TF1 code]
(google-research/dreamer, the code of the paper's experiments) and [DreamerV2 code] tag the few
details taken from those instead.

Glossary (paper symbol → name here, shape):
    o_t  image observation        obs      uint8 [3, 64, 64] in replay, float in [−½, ½] for nets
    a_t  action                   action   [A], each entry in [−1, 1] (Atari: one-hot)
    r_t  reward                   reward   scalar
    h_t  deterministic state      h        [deter_size]            (GRU memory of the RSSM)
    z_t  stochastic state         z        [stoch_size]            (diagonal Gaussian sample)
    s_t  model state = (z_t, h_t) feat     [stoch_size + deter_size] = cat(z, h)
    H    imagination horizon      horizon
    γ, λ discount, λ-return mix   discount, lam
    θ, φ, ψ  world model, actor, value model parameters
Conventions: replay batches are batch-major [B, L, ...] (B sequences of L steps); imagined
trajectories are time-major [H, N, ...] with N = B·L start states. Replay row t holds
(a_{t−1}, r_t, o_t): the action that led to o_t and the reward received with it.
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ############################################################################################
# Part I. The paper's algorithm, by dependency: Sec. 4's world model, Sec. 3's behaviour, the losses
# ############################################################################################

# ============================================================================================
# Configuration: the paper's hyperparameters (Sec. 6, appendix), then the options beyond it
# ============================================================================================

def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Every setting of a run; `python dreamer.py --help` lists them. The defaults are the paper's
    values, or the official code's where tagged [official code]. The last group is not in the
    paper: its defaults switch each option off, except replay_capacity, which bounds memory."""
    # Schedule (Algorithm 1). Env steps count frames (each action counts R), as the paper does.
    steps: int = _f(5_000_000, "total env steps to train for (paper Fig. 6: 5e6)")
    action_repeat: int = _f(2, "R: each action is repeated R env steps (paper, all DMC tasks)")
    time_limit: int = _f(1000, "episode length T in env steps (DMC default 1000)")
    seed_episodes: int = _f(5, "S: random-action episodes before training (Algorithm 1)")
    train_every: int = _f(1000, "env steps between training phases [official code]")
    train_steps: int = _f(100, "C: gradient updates per training phase (Algorithm 1)")
    batch_size: int = _f(50, "B: sequences per batch (paper Sec. 6)")
    batch_length: int = _f(50, "L: steps per sequence (paper Sec. 6)")
    # World model (Sec. 4 and Appendix A).
    cnn_depth: int = _f(32, "encoder/decoder channels multiplier: 32·(1,2,4,8) [official code]")
    deter_size: int = _f(200, "size of the deterministic state h_t (GRU) [official code]")
    stoch_size: int = _f(30, "size of the stochastic state z_t (diagonal Gaussian) [official code]")
    hidden_size: int = _f(200, "width of the RSSM's dense layers [official code]")
    min_std: float = _f(0.1, "floor on the RSSM's std: σ = softplus(x) + min_std [official code]")
    units: int = _f(400, "width of reward/value/actor layers (paper text: 300) [official code]")
    reward_layers: int = _f(2, "hidden layers of the reward model q(r_t | s_t) [official code]")
    value_layers: int = _f(3, "hidden layers of the value model v_ψ(s_τ) [official code]")
    actor_layers: int = _f(4, "hidden layers of the actor q_φ(a_τ | s_τ) [official code]")
    discount_scale: float = _f(0.0, "weight of the discount predictor q(γ_t | s_t) (paper "
                                    "appendix) beside Eq. 10's terms; 0: none, for tasks that "
                                    "never end early (DMC); 10 for Atari [official code]")
    # World-model loss (Eq. 10) and optimisation.
    free_nats: float = _f(3.0, "free nats: KL term is max(mean KL, free_nats) [official code]")
    kl_scale: float = _f(1.0, "β: weight of the KL term J_D in Eq. 10")
    reward_transform: str = _f("none", "none, or tanh: the world model learns tanh(r_t) "
                                       "(paper appendix, Atari: rewards bounded with tanh)")
    representation: str = _f("reconstruction", "the world model's observation term (Sec. 4): "
                                               "reconstruction (J_O, Eq. 10), contrastive "
                                               "(J_NCE) or reward (none: reward and KL only)")
    model_lr: float = _f(6e-4, "Adam learning rate of the world model θ (paper Sec. 6)")
    actor_lr: float = _f(8e-5, "Adam learning rate of the actor φ (paper Sec. 6)")
    value_lr: float = _f(8e-5, "Adam learning rate of the value model ψ (paper Sec. 6)")
    adam_eps: float = _f(1e-7, "Adam ε, TF2 Keras' default [official code]")
    grad_clip: float = _f(100.0, "clip each optimiser's gradients to this global norm (paper)")
    # Behaviour learning (Sec. 3).
    horizon: int = _f(15, "H: imagination horizon (paper Sec. 6)")
    discount: float = _f(0.99, "γ: discount of imagined rewards (paper Sec. 6)")
    lam: float = _f(0.95, "λ: mixes the k-step returns of Eq. 6 (paper Sec. 6)")
    value_estimate: str = _f("lambda", "actor and value target: lambda (V_λ, Eq. 6), nstep "
                                       "(V_N^k, Eq. 5) or reward (V_R, Eq. 4, the paper's "
                                       "no-value ablation)")
    nstep_k: int = _f(0, "k of V_N^k (Eq. 5) for --value_estimate nstep; 0 means H")
    actor_dist: str = _f("tanh_normal", "the actor's distribution: tanh_normal (Eq. 3), onehot "
                                        "(discrete actions, appendix) or trunc_normal "
                                        "(DreamerV2's; not in the paper)")
    actor_mean_scale: float = _f(5.0, "mean = s·tanh(μ/s) bounds the actor's mean [official code]")
    actor_init_std: float = _f(5.0, "actor std at initialisation [official code]")
    actor_min_std: float = _f(1e-4, "floor on the actor's std [official code]")
    expl_noise: float = _f(0.3, "std of Gaussian noise added to actions while collecting (paper)")
    epsilon_start: float = _f(0.4, "discrete actions: ε-greedy exploration, ε from this … "
                                   "(paper appendix, Atari)")
    epsilon_end: float = _f(0.1, "… to this, linearly over the first epsilon_updates updates")
    epsilon_updates: int = _f(200_000, "updates over which ε falls (paper appendix, Atari)")
    epsilon_eval: float = _f(0.001, "discrete actions: ε of ε-greedy in evaluation, so that a "
                                    "game never stalls on one action [paper's TF1 code]")
    # Evaluation and seeding.
    eval_every: int = _f(10_000, "env steps between evaluations (10k, 20k, …) [official code]")
    eval_episodes: int = _f(1, "episodes per evaluation, policy mode, no noise [official code]")
    seed: int = _f(0, "seeds Python, numpy, torch, the replay sampler and the environment")
    # Not in the paper (Part II): options beyond it, state inputs, speed, machinery.
    actor_entropy: float = _f(0.0, "η: weight of an entropy bonus in the actor loss (not in "
                                   "the paper, which has 0; DreamerV2 uses 1e-4)")
    return_norm: str = _f("none", "none (paper), or percentile: the actor's returns ÷ max(1, S), "
                                  "S their 5th–95th percentile range (DreamerV3's)")
    obs: str = _f("pixels", "what the agent sees: pixels (the paper's 64×64 images) or state "
                            "(the task's state vector, dense encoder and decoder; not in the "
                            "paper)")
    state_transform: str = _f("none", "--obs state only: none (the raw values) or symlog "
                                      "(sign(x)·ln(1+|x|), DreamerV3's) on the state vector")
    precision: str = _f("fp32", "fp32, or bf16 for the encoder/decoder convolutions (speed; "
                                "the official code uses mixed fp16)")
    shadow_size: int = _f(2048, "renderer's shadow map, pixels per side (2048: MuJoCo's default; "
                                "256 renders 1.7x faster, see DMCEnv)")
    checkpoint_every: int = _f(10_000, "env steps between checkpoints (not in the paper)")
    replay_capacity: int = _f(1_000_000, "env steps of episodes the replay keeps in memory for "
                                         "sampling; the oldest leave memory first, their files "
                                         "stay (not in the paper, which keeps all; 0: no bound)")


# ============================================================================================
# Small building blocks
# ============================================================================================

# Four speed helpers appear in Part I, each the same maths as its plain form and defined in
# Part II's "Speed": Linear (nn.Linear), conv_precision (bf16 convolutions when asked),
# channels_last (a memory layout) and deconv_on_1x1 (a transposed convolution of a 1×1 image).
def mlp(inp, units, layers, out):
    """`layers` dense ELU layers of `units`, then a linear output (every head) [official code]."""
    mods = []
    for _ in range(layers):
        mods += [Linear(inp, units), nn.ELU()]
        inp = units
    return nn.Sequential(*mods, Linear(inp, out))


def init_like_keras(module):
    """[official code] Keras defaults: Glorot-uniform kernels, zero biases, orthogonal GRU
    recurrent kernel. PyTorch's own defaults differ in scale; we match the reference."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GRUCell):
            nn.init.xavier_uniform_(m.weight_ih)
            nn.init.orthogonal_(m.weight_hh)
            nn.init.zeros_(m.bias_ih)
            nn.init.zeros_(m.bias_hh)


def gaussian_log_likelihood(mean, x):
    """ln N(x; mean, 1) per element, dropping the constant −½·ln 2π (it carries no gradient):
    −½·(x − mean)². The reward term uses it; the image term computes the same with mse_loss."""
    return -0.5 * (x - mean) ** 2


def kl_gaussian(mean1, std1, mean2, std2):
    """KL(N(μ₁, σ₁) ‖ N(μ₂, σ₂)) of diagonal Gaussians, per dimension (Eq. 10's J_D takes the
    posterior as the first, the prior as the second):
    ln(σ₂/σ₁) + (σ₁² + (μ₁ − μ₂)²)/(2σ₂²) − ½."""
    return (torch.log(std2 / std1)
            + (std1 ** 2 + (mean1 - mean2) ** 2) / (2 * std2 ** 2) - 0.5)


def preprocess(obs, state_transform="none"):
    """uint8 pixels in [0, 255] → float in [−½, ½] [official code]. A float state vector (--obs
    state, not in the paper) passes as it is, or through symlog(x) = sign(x)·ln(1 + |x|) with
    state_transform "symlog" (DreamerV3's input and target transform)."""
    if obs.dtype == torch.uint8:
        return obs.float() / 255.0 - 0.5
    obs = obs.float()
    return symlog(obs) if state_transform == "symlog" else obs


# ============================================================================================
# World model, part 1: the encoder (Sec. 4, "representation model" input; Appendix A)
# ============================================================================================

class Encoder(nn.Module):
    """Four convolutions (kernel 4, stride 2, valid padding, ReLU): 64→31→14→6→2 pixels,
    channels d·(1, 2, 4, 8), flattened to an embedding of 32·d = 1024 features at d = 32."""

    def __init__(self, depth, precision="fp32"):
        super().__init__()
        d, self.precision = depth, precision
        self.convs = nn.ModuleList([nn.Conv2d(3, d, 4, 2), nn.Conv2d(d, 2 * d, 4, 2),
                                    nn.Conv2d(2 * d, 4 * d, 4, 2), nn.Conv2d(4 * d, 8 * d, 4, 2)])
        self.embed_size = 32 * d  # 8d channels × 2 × 2 pixels
        channels_last(self)                             # speed: the weights' memory layout

    def forward(self, obs):
        # obs: [..., 3, 64, 64] floats → embed: [..., 32·d]
        lead = obs.shape[:-3]
        x = channels_last(obs.reshape(-1, *obs.shape[-3:]))         # [N, 3, 64, 64]
        with conv_precision(self.precision, x.device):
            for conv in self.convs:
                x = F.relu(conv(x), inplace=True)       # [N, 8d, 2, 2] after the last one
        return x.float().reshape(*lead, self.embed_size)   # [..., 32·d]


# ============================================================================================
# World model, part 2: the recurrent state-space model, RSSM (Eq. 1; PlaNet, Sec. 4)
# ============================================================================================

class RSSM(nn.Module):
    """The model state s_t = (z_t, h_t) has a deterministic part h_t (a GRU's memory) and a
    stochastic part z_t (a diagonal Gaussian sample). Eq. 1 names three models; two live here:

        transition      q(s_t | s_{t−1}, a_{t−1}):  h_t = GRU(h_{t−1}, ELU(W·[z_{t−1}, a_{t−1}])),
                                                    z_t ~ N(μ(h_t), σ(h_t))            (prior)
        representation  p(s_t | s_{t−1}, a_{t−1}, o_t): same h_t,
                                                    z_t ~ N(μ(h_t, e_t), σ(h_t, e_t))  (posterior)

    (The paper writes p for representation and q for transition; e_t = encoder(o_t).) The prior
    and posterior share h_t [official code]. σ = softplus(x) + min_std [official code]."""

    def __init__(self, cfg, action_dim, embed_size):
        super().__init__()
        Z, D, Hd = cfg.stoch_size, cfg.deter_size, cfg.hidden_size
        self.stoch_size, self.deter_size, self.min_std = Z, D, cfg.min_std
        self.img_in = Linear(Z + action_dim, Hd)        # [z_{t−1}, a_{t−1}] → GRU input
        # h_{t−1} → h_t; the same gates as Keras' GRUCell (reset_after=True) [official code]
        self.gru = nn.GRUCell(Hd, D)
        self.img_hidden = Linear(D, Hd)                 # h_t → prior hidden
        self.img_out = Linear(Hd, 2 * Z)                # → prior (μ, σ)
        self.obs_hidden = Linear(D + embed_size, Hd)    # [h_t, e_t] → posterior hidden
        self.obs_out = Linear(Hd, 2 * Z)                # → posterior (μ, σ)

    def initial(self, batch, device):
        """s_0: zero stochastic and deterministic state [official code]."""
        return (torch.zeros(batch, self.stoch_size, device=device),
                torch.zeros(batch, self.deter_size, device=device))

    def _gaussian(self, x):
        mean, std = x.chunk(2, -1)
        return mean, F.softplus(std) + self.min_std

    def prior(self, z, h, action):
        """(Eq. 1) transition q(s_t | s_{t−1}, a_{t−1}). z [N, Z], h [N, D], action [N, A]
        → h_t [N, D] and the prior's mean, std [N, Z]."""
        # EXERCISE rssm_prior: img_in, ELU, gru; then img_hidden, ELU, img_out, self._gaussian
        x = F.elu(self.img_in(torch.cat([z, action], -1)))
        h = self.gru(x, h)
        mean, std = self._gaussian(self.img_out(F.elu(self.img_hidden(h))))
        return h, mean, std
        # END EXERCISE

    def posterior(self, h, embed):
        """(Eq. 1) representation p(s_t | s_{t−1}, a_{t−1}, o_t) given the new h_t [N, D] and
        the image embedding e_t [N, E] → the posterior's mean, std [N, Z]."""
        # EXERCISE rssm_posterior: obs_hidden on [h_t, e_t], ELU, obs_out, self._gaussian
        return self._gaussian(self.obs_out(F.elu(self.obs_hidden(torch.cat([h, embed], -1)))))
        # END EXERCISE

    def imagine_step(self, z, h, action):
        """One step of imagination: sample z_t from the prior. Reparameterised, so gradients
        flow from later states back to the action (needed by Eq. 7)."""
        h, mean, std = self.prior(z, h, action)
        return mean + std * torch.randn_like(std), h

    def observe(self, embed, action, state=None):
        """Filter a batch of sequences with the posterior.
        embed [B, L, E], action [B, L, A] (row t holds a_{t−1}) → dict of [B, L, ...] tensors:
        z, h (posterior samples and deterministic states), post/prior mean and std."""
        B, L = embed.shape[:2]
        z, h = state if state is not None else self.initial(B, embed.device)
        out = {k: [] for k in ("z", "h", "post_mean", "post_std", "prior_mean", "prior_std")}
        for t in range(L):                                          # sequential scan over time
            h, prior_mean, prior_std = self.prior(z, h, action[:, t])
            post_mean, post_std = self.posterior(h, embed[:, t])
            z = post_mean + post_std * torch.randn_like(post_std)   # z_t ~ posterior
            for k, v in zip(out, (z, h, post_mean, post_std, prior_mean, prior_std)):
                out[k].append(v)
        return {k: torch.stack(v, 1) for k, v in out.items()}       # each [B, L, ·]


# ============================================================================================
# World model, part 3: the decoder, observation model q(o_t | s_t) (Sec. 4, Eq. 10's J_O), or
# the state model q(s_t | o_t) of contrastive estimation (Sec. 4, Eq. 11–13)
# ============================================================================================

class Decoder(nn.Module):
    """Dense to 32·d features, read as a 1×1 image, then four transposed convolutions
    (kernels 5, 5, 6, 6, stride 2, ReLU between): 1→5→13→30→64 pixels. The output is the mean
    of a unit-variance Gaussian over pixels [official code]."""

    def __init__(self, depth, feat_size, precision="fp32"):
        super().__init__()
        d, self.precision = depth, precision
        self.fc = Linear(feat_size, 32 * d)
        self.deconvs = nn.ModuleList([
            nn.ConvTranspose2d(32 * d, 4 * d, 5, 2), nn.ConvTranspose2d(4 * d, 2 * d, 5, 2),
            nn.ConvTranspose2d(2 * d, d, 6, 2), nn.ConvTranspose2d(d, 3, 6, 2)])
        channels_last(self)                             # speed: as in the encoder

    def forward(self, feat):
        # feat: [..., F] → mean image [..., 3, 64, 64]
        lead = feat.shape[:-1]
        x = self.fc(feat).reshape(-1, self.fc.out_features, 1, 1)    # [N, 32d, 1, 1]: 1×1 image
        x = channels_last(F.relu(deconv_on_1x1(self.deconvs[0], x)))  # [N, 4d, 5, 5]
        with conv_precision(self.precision, x.device):
            for i, deconv in enumerate(self.deconvs[1:], 1):         # 5 → 13 → 30 → 64 pixels
                x = deconv(x)
                if i < len(self.deconvs) - 1:
                    x = F.relu(x, inplace=True)
        return x.float().reshape(*lead, 3, 64, 64)


class StateModel(nn.Module):
    """(Eq. 11–13) The state model q(s_t | o_t) of contrastive estimation (Sec. 4, --representation
    contrastive), which takes the decoder's place: a diagonal Gaussian over the model state
    s_t = cat(z_t, h_t) given the image alone. The paper calls it a CNN; it reads the encoder's
    embedding of o_t (the encoder is the CNN, shared with the RSSM) through [paper's TF1 code]
    3 × `units` ELU layers → mean and std, σ = softplus(x) + 0.01."""

    def __init__(self, cfg, embed_size, feat_size):
        super().__init__()
        self.net = mlp(embed_size, cfg.units, 3, 2 * feat_size)

    def forward(self, embed):
        """embed [..., E] → mean and std of q(s_t | o_t), each [..., F]."""
        mean, std = self.net(embed).chunk(2, -1)
        return mean, F.softplus(std) + 0.01


# ============================================================================================
# World model, part 4: the reward model q(r_t | s_t) (Eq. 1), the discount predictor q(γ_t | s_t)
# (appendix, Atari), and the assembled world model
# ============================================================================================

class RewardModel(nn.Module):
    """(Eq. 1) reward model q(r_t | s_t) = N(mean(s_t), 1): 2 × 400 ELU → 1 [official code]."""

    def __init__(self, cfg, feat_size):
        super().__init__()
        self.net = mlp(feat_size, cfg.units, cfg.reward_layers, 1)

    def forward(self, feat):
        return self.net(feat).squeeze(-1)               # [...] mean reward


class DiscountModel(nn.Module):
    """The discount predictor q(γ_t | s_t) for tasks that can end early (paper appendix, "Atari
    and DeepMind Lab": "a binary classifier that is trained towards the soft labels of 0 and
    γ"): a Bernoulli whose mean is the probability-weighted discount of continuing after s_t.
    [official code] 3 × 400 ELU → 1 logit, loss weight --discount_scale (10), and only for
    tasks that can end early (Atari); on DMC there is none and γ is a constant."""

    def __init__(self, cfg, feat_size):
        super().__init__()
        self.net = mlp(feat_size, cfg.units, 3, 1)

    def forward(self, feat):
        return self.net(feat).squeeze(-1)               # [...] logit; the mean is its sigmoid


def model_reward(wm, reward):
    """Real rewards as the reward model learns them: tanh(r) with --reward_transform tanh
    (paper appendix, Atari: bounded rewards), else r. Training and the pictures use it."""
    return torch.tanh(reward) if wm.reward_transform == "tanh" else reward


# The world model's observation term (Sec. 4), by --representation: reconstruction (the paper's
# Dreamer, Eq. 10), contrastive estimation, or reward prediction alone (world_model_loss).
REPRESENTATIONS = ("reconstruction", "contrastive", "reward")


class WorldModel(nn.Module):
    """θ: encoder, RSSM, decoder and reward model, trained together by Eq. 10. With
    --representation contrastive a state model q(s_t | o_t) replaces the decoder; with reward
    there is neither (decoder and state_model are None when absent). A discount predictor
    (discount) is there only for tasks that can end early (Atari)."""

    def __init__(self, cfg, action_dim, obs_shape=(3, 64, 64)):
        super().__init__()
        self.feat_size = cfg.stoch_size + cfg.deter_size   # s_t = cat(z_t, h_t)
        # obs_shape: (3, 64, 64) images, or (O,) state vectors (--obs state, not in the paper)
        self.obs_shape, self.state_transform = tuple(obs_shape), cfg.state_transform
        pixels = cfg.obs == "pixels"
        if len(self.obs_shape) != (3 if pixels else 1):
            raise ValueError(f"--obs {cfg.obs} does not fit observations of shape {obs_shape}")
        self.encoder = (Encoder(cfg.cnn_depth, cfg.precision) if pixels
                        else DenseEncoder(self.obs_shape[0], cfg.units))
        self.rssm = RSSM(cfg, action_dim, self.encoder.embed_size)
        self.representation, self.decoder, self.state_model = cfg.representation, None, None
        self.reward_transform = cfg.reward_transform        # what the reward model predicts
        if cfg.representation == "reconstruction":
            self.decoder = (Decoder(cfg.cnn_depth, self.feat_size, cfg.precision) if pixels
                            else DenseDecoder(self.feat_size, self.obs_shape[0], cfg.units))
        elif cfg.representation == "contrastive":
            self.state_model = StateModel(cfg, self.encoder.embed_size, self.feat_size)
        self.reward = RewardModel(cfg, self.feat_size)
        # q(γ_t | s_t), only where episodes can end early (--discount_scale > 0: Atari)
        self.discount = DiscountModel(cfg, self.feat_size) if cfg.discount_scale > 0 else None
        init_like_keras(self)


# ============================================================================================
# Behaviour, part 1: the action model (actor) q_φ(a_τ | s_τ) (Eq. 2, Eq. 3; discrete: appendix)
# ============================================================================================

class Actor(nn.Module):
    """(Eq. 2, 3) The action model q_φ(a_τ | s_τ): a_τ = tanh(μ_φ(s_τ) + σ_φ(s_τ)·ε),
    ε ~ N(0, I), a tanh-squashed Gaussian sampled with the reparameterisation trick so that
    ∂a/∂φ exists. 4 × 400 ELU layers.
    [official code] mean = 5·tanh(μ/5) and σ = softplus(x + softplus⁻¹(5)) + 10⁻⁴, so that
    σ ≈ 5 at initialisation: wide, exploratory actions early on."""

    def __init__(self, cfg, action_dim):
        super().__init__()
        self.net = mlp(cfg.stoch_size + cfg.deter_size, cfg.units, cfg.actor_layers,
                       2 * action_dim)
        self.mean_scale, self.min_std = cfg.actor_mean_scale, cfg.actor_min_std
        # softplus⁻¹(s) = ln(eˢ − 1) = s + ln(1 − e⁻ˢ), the second form without overflow
        self.raw_init_std = cfg.actor_init_std + math.log(-math.expm1(-cfg.actor_init_std))
        init_like_keras(self)

    def dist_params(self, feat):
        """feat [..., F] → pre-tanh Gaussian mean and std, each [..., A]."""
        mean, std = self.net(feat).chunk(2, -1)
        mean = self.mean_scale * torch.tanh(mean / self.mean_scale)
        std = F.softplus(std + self.raw_init_std) + self.min_std
        return mean, std

    discrete = False

    @staticmethod
    def mode(mean):
        """The action forward(sample=False) returns, from dist_params' mean: tanh(μ)."""
        return torch.tanh(mean)

    @staticmethod
    def explore(action, cfg, updates):
        """(paper Sec. 6) Exploration while collecting: a ← clip(a + N(0, 0.3), −1, 1)."""
        return torch.clamp(action + cfg.expl_noise * torch.randn_like(action), -1, 1)

    @staticmethod
    def evaluation(action, cfg):
        """The action evaluation plays, from forward(sample=False)'s: that action itself."""
        return action

    def forward(self, feat, sample=True):
        """Return (action, log q_φ(action | s)); sample=False gives tanh(μ), the deterministic
        action used for evaluation: the pre-tanh Gaussian's mode pushed through tanh, which is
        the squashed distribution's median (its mode too once σ is small). A difference from
        the official code, which keeps the most likely of 100 samples (README: differences)."""
        mean, std = self.dist_params(feat)
        u = mean + std * torch.randn_like(std) if sample else mean   # (Eq. 3) pre-tanh sample
        action = torch.tanh(u)
        # log-density of the squashed sample: ln N(u; μ, σ) − Σ ln(1 − tanh²u), where
        # ln(1 − tanh²u) = 2·(ln 2 − u − softplus(−2u)) is the numerically stable form.
        normal = -0.5 * ((u - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
        log_det = 2 * (math.log(2) - u - F.softplus(-2 * u))
        return action, (normal - log_det).sum(-1)


def epsilon(cfg, updates):
    """(paper appendix, Atari) ε of ε-greedy exploration after `updates` gradient updates:
    linear from epsilon_start (0.4) to epsilon_end (0.1) over epsilon_updates (200,000), then
    constant. Counted in updates, which the checkpoint keeps, so a resumed run goes on."""
    fraction = min(1.0, updates / cfg.epsilon_updates)
    return cfg.epsilon_start + fraction * (cfg.epsilon_end - cfg.epsilon_start)


class OneHotActor(nn.Module):
    """Discrete actions (Sec. 3, and appendix "Atari and DeepMind Lab": "the action model
    predicts the logits of a categorical distribution"), chosen by --actor_dist onehot, the
    Atari default. 4 × 400 ELU → A logits, A = the game's minimal action set. a_τ is a one-hot
    vector [A], sampled with straight-through gradients "for the sampling step during latent
    imagination": forward the one-hot sample, backward through the probabilities,

        a = onehot(k) + (p − sg(p)),   k ~ Categorical(p),   p = softmax(logits),

    so ∂a/∂logits = ∂p/∂logits and Eq. 7 reaches φ through the imagined dynamics as for
    continuous actions. Evaluation takes the most likely action; exploration is ε-greedy."""

    discrete = True

    def __init__(self, cfg, action_dim):
        super().__init__()
        self.net = mlp(cfg.stoch_size + cfg.deter_size, cfg.units, cfg.actor_layers, action_dim)
        init_like_keras(self)

    def dist_params(self, feat):
        """feat [..., F] → (logits [..., A], None)."""
        return self.net(feat), None

    @staticmethod
    def mode(logits):
        """The most likely action, one-hot [..., A]."""
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)

    def forward(self, feat, sample=True):
        """Return (action one-hot [..., A], ln q_φ(action | s) [...]); sample=False gives the
        mode. The sample carries the straight-through gradient; its log-probability does not
        depend on it (the one-hot is detached there)."""
        # EXERCISE onehot_actor: logits → p; k ~ p; a = onehot(k) + (p − sg(p)); ln p_k of sg(a)
        logits = self.net(feat)
        if sample:
            probs = torch.softmax(logits, -1)                                   # p: [..., A]
            index = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1)    # k: [N, 1]
            onehot = F.one_hot(index.reshape(probs.shape[:-1]), probs.shape[-1]).to(probs.dtype)
            # (p − sg(p)) is exactly 0 in value, so the forward action is exactly one-hot
            action = onehot + (probs - probs.detach())                          # straight through
        else:
            action = self.mode(logits)
        log_prob = (action.detach() * torch.log_softmax(logits, -1)).sum(-1)
        return action, log_prob
        # END EXERCISE

    @staticmethod
    def explore(action, cfg, updates):
        """ε-greedy (paper appendix): with probability ε = epsilon(cfg, updates) each row's
        action is replaced by one drawn uniformly from all A actions. action: one-hot [N, A]."""
        # EXERCISE epsilon_greedy: per row, with probability epsilon(cfg, updates) a uniform one-hot
        N, A = action.shape
        random = F.one_hot(torch.randint(A, (N,), device=action.device), A).to(action.dtype)
        replace = torch.rand(N, 1, device=action.device) < epsilon(cfg, updates)
        return torch.where(replace, random, action)
        # END EXERCISE

    @staticmethod
    def evaluation(action, cfg):
        """[paper's TF1 code] (test_action_noise) Evaluation plays the most likely action but,
        with probability ε = cfg.epsilon_eval (0.001), a uniformly random one, so that a policy
        that never presses FIRE after a lost life cannot stall a game until the frame cap.
        action: one-hot [N, A]."""
        N, A = action.shape
        random = F.one_hot(torch.randint(A, (N,), device=action.device), A).to(action.dtype)
        replace = torch.rand(N, 1, device=action.device) < cfg.epsilon_eval
        return torch.where(replace, random, action)


# The actor's distribution, by --actor_dist: the paper's continuous actor (Eq. 3) and its
# discrete one (Atari); Part II adds DreamerV2's. The actor's return normalisation, by
# --return_norm: none, the paper's; Part II adds DreamerV3's.
ACTORS = {"tanh_normal": Actor, "onehot": OneHotActor}
RETURN_NORMS = {"none": lambda: None}


# ============================================================================================
# Behaviour, part 2: the value model v_ψ(s_τ) (Eq. 2)
# ============================================================================================

class ValueModel(nn.Module):
    """(Eq. 2) v_ψ(s_τ) ≈ E[Σ_{τ'=τ}^{t+H} γ^{τ'−τ} r_τ']: 3 × 400 ELU → 1 [official code].
    No target network (the final paper version has none)."""

    def __init__(self, cfg):
        super().__init__()
        self.net = mlp(cfg.stoch_size + cfg.deter_size, cfg.units, cfg.value_layers, 1)
        init_like_keras(self)

    def forward(self, feat):
        return self.net(feat).squeeze(-1)               # [...] value


# ============================================================================================
# Value estimates (Eq. 4–6)
# ============================================================================================

# Eq. 4: V_R(s_τ) = E[Σ_{n=τ}^{t+H} r_n]                        (rewards only, an ablation)
# Eq. 5: V_N^k(s_τ) = E[Σ_{n=τ}^{h−1} γ^{n−τ} r_n + γ^{h−τ} v_ψ(s_h)],  h = min(τ + k, t + H)
# Eq. 6: V_λ(s_τ) = (1−λ) Σ_{n=1}^{H−1} λ^{n−1} V_N^n(s_τ) + λ^{H−1} V_N^H(s_τ)
# Eq. 6 equals the backward recursion in lambda_return, which costs O(H) instead of O(H²);
# test_dreamer.py checks the two against each other. λ = 1 gives the discounted sum plus
# bootstrap, λ = 0 the one-step target r_τ + γ·v(s_{τ+1}), γ = 0 the rewards alone.
# Time-major tensors [T, ...]: index t is imagination step τ; value[t] is v_ψ(s_t), and the
# bootstrap [...] is v_ψ(s_T), the value of the state after the last one.
def reward_sum(reward):
    """(Eq. 4) V_R(s_τ) = Σ_{n=τ}^{T−1} r_n: the imagined rewards up to the horizon, no value
    model (the paper's "no value" ablation, --value_estimate reward). [T, ...] → [T, ...]."""
    # EXERCISE reward_sum: a cumulative sum over time, taken backwards
    return reward.flip(0).cumsum(0).flip(0)
    # END EXERCISE


def nstep_return(reward, value, discount, bootstrap, k):
    """(Eq. 5) V_N^k(s_τ) = Σ_{n=τ}^{h−1} γ^{n−τ}·r_n + γ^{h−τ}·v(s_h),  h = min(τ + k, T),
    with γ^{n−τ} read as the product of the discounts d_τ … d_{n−1}. [T, ...] → [T, ...].
    Written as the sum it is (O(T·k)); Eq. 6 mixes these for k = 1 … H."""
    # EXERCISE nstep_return: per τ, sum to h = min(τ + k, T), multiplying the discounts as you go
    T = reward.shape[0]
    values = torch.cat([value, bootstrap[None]], 0)                     # v(s_0) … v(s_T)
    out = []
    for tau in range(T):
        h = min(tau + k, T)
        total, weight = torch.zeros_like(reward[0]), torch.ones_like(reward[0])
        for n in range(tau, h):
            total = total + weight * reward[n]                          # γ^{n−τ}·r_n
            weight = weight * discount[n]
        out.append(total + weight * values[h])                          # + γ^{h−τ}·v(s_h)
    return torch.stack(out, 0)
    # END EXERCISE


def lambda_return(reward, value, discount, bootstrap, lam):
    """(Eq. 6) R_t = r_t + d_t·((1−λ)·v_{t+1} + λ·R_{t+1}),  with v_T = R_T = bootstrap;
    R_t is V_λ(s_t) and d_t the discount γ (or the discount predictor's, Atari).
    reward, value, discount: time-major [T, ...]; bootstrap: [...] → returns [T, ...]."""
    # EXERCISE lambda_return: scan t = T−1 … 0 from R_T = bootstrap; no loop over k is needed
    next_value = torch.cat([value[1:], bootstrap[None]], 0)            # v_{t+1}: [T, ...]
    inputs = reward + discount * (1 - lam) * next_value               # the part without R_{t+1}
    returns, last = [], bootstrap
    for t in reversed(range(reward.shape[0])):                          # scan backwards in time
        last = inputs[t] + discount[t] * lam * last                     # R_t
        returns.append(last)
    return torch.stack(returns[::-1], 0)                                # [T, ...]
    # END EXERCISE


# ============================================================================================
# Losses (Eq. 10 world model, Eq. 7 actor, Eq. 8 value) and the agent that owns the optimisers
# ============================================================================================

@contextlib.contextmanager
def frozen(*modules):
    """"The world model is fixed while learning behaviours" (Sec. 3): in PyTorch a loss reaches
    every parameter it depends on, so we switch their gradients off for the duration."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def contrastive_log_likelihood(feat, mean, std):
    """(Eq. 11–13, Sec. 4) contrastive estimation's observation term J_NCE, which replaces J_O:
    ln q(s_t | o_t) − ln Σ_{o′} q(s_t | o′), the sum over the N observations o′ of the batch,
    as the paper writes it: the normaliser runs over observations for a fixed state (the
    paper's TF1 code normalises the other way, over states for a fixed observation; both are
    InfoNCE bounds). feat [..., F]: the states s_t; mean, std [..., F]: q(s | o) of each
    position's own observation. → the mean over the N states, 0-d, ≤ 0: 0 when each state is
    told apart by its own image, ln(1/N) when images tell nothing. Its gradient reaches the
    state model, the encoder and the states s_t."""
    # EXERCISE contrastive_log_likelihood: table ln q(s_i | o_j) [N, N]; diagonal − logsumexp_j
    s, mean, std = (x.reshape(-1, x.shape[-1]) for x in (feat, mean, std))      # [N, F]
    # ln q(s_i | o_j) for all pairs i, j: [N, N], without the constant −(F/2)·ln 2π, which
    # cancels. −½ Σ_d (s_id − μ_jd)²·w_jd − Σ_d ln σ_jd, w = 1/σ², expanded into matrix
    # products so that no [N, N, F] table is built (N = B·L = 2500 at the paper's batch).
    # Shifting s and μ by the same vector c leaves every difference s_i − μ_j, and so the
    # logits, unchanged; c = the batch mean keeps the squares small in float32.
    c = s.mean(0).detach()
    s, mean = s - c, mean - c
    w = std.pow(-2)
    sq = (s * s) @ w.t() - 2 * s @ (mean * w).t() + (mean * mean * w).sum(-1)  # Σ_d (s−μ)²w
    logits = -0.5 * sq - torch.log(std).sum(-1)                    # [N states, N images]
    return (logits.diagonal() - torch.logsumexp(logits, 1)).mean()
    # END EXERCISE


def world_model_loss(wm, batch, cfg):
    """(Eq. 10) J_REC = E[Σ_t (J_O^t + J_R^t + J_D^t)], maximised; we minimise its negative,
    [official code] averaged over the B·L steps instead of summed (so free nats count per step).
    batch: obs uint8 [B, L, 3, 64, 64], action [B, L, A] (a_{t−1}), reward [B, L] (r_t), and
    terminal [B, L] for the discount predictor. Returns (loss, metrics, posterior states z
    [B, L, Z] and h [B, L, D]); metrics: 0-d model/loss, model/image_loss (−J_O),
    model/reward_loss (−J_R), model/kl (before free nats), model/prior_entropy, post_entropy.
    Other representations (Sec. 4, cfg.representation): contrastive replaces J_O by J_NCE
    (Eq. 11–13; model/contrastive_loss), reward drops it. Tasks that end early add the
    discount predictor's −discount_scale·J_γ (appendix; model/discount_loss)."""
    # EXERCISE world_model_loss: encode, rssm.observe, decode; β·max(KL, free nats) − J_O − J_R
    obs = preprocess(batch["obs"], wm.state_transform)   # [B, L, 3, 64, 64] (state: [B, L, O])
    embed = wm.encoder(obs)                                         # [B, L, E]
    s = wm.rssm.observe(embed, batch["action"])                     # each [B, L, ·]
    feat = torch.cat([s["z"], s["h"]], -1)                          # s_t: [B, L, Z + D]
    B, L = batch["reward"].shape
    if cfg.representation == "reconstruction":
        # J_O = ln q(o_t | s_t) = −½‖o_t − ô_t‖², summed over the 3·64·64 pixels, averaged over
        # B, L. speed: mse_loss is one fused pass (forward and backward) over the 30M pixels of
        # a batch, where −½·(o − ô)² written out takes four; the value is the same.
        obs_ll = -0.5 * F.mse_loss(wm.decoder(feat), obs, reduction="sum") / (B * L)
        obs_metric = {"model/image_loss": -obs_ll}
    elif cfg.representation == "contrastive":   # (Eq. 11–13) J_NCE over the batch's B·L images
        obs_ll = contrastive_log_likelihood(feat, *wm.state_model(embed))
        obs_metric = {"model/contrastive_loss": -obs_ll}
    else:                                       # reward prediction alone: no observation term
        obs_ll, obs_metric = 0.0, {}
    # J_R = ln q(r_t | s_t), averaged over B and L.
    reward_ll = gaussian_log_likelihood(wm.reward(feat), batch["reward"]).mean()
    # J_D = −β·KL(p(s_t | s_{t−1}, a_{t−1}, o_t) ‖ q(s_t | s_{t−1}, a_{t−1})): summed over z's
    # dimensions, averaged over B and L; then free nats [official code]: max(mean KL, 3), so the
    # KL has no gradient while it is below 3 nats.
    kl = kl_gaussian(s["post_mean"], s["post_std"], s["prior_mean"], s["prior_std"])
    kl = kl.sum(-1).mean()
    kl_loss = torch.clamp(kl, min=cfg.free_nats)
    loss = cfg.kl_scale * kl_loss - obs_ll - reward_ll              # −J_REC
    if wm.discount is not None:
        # J_γ = ln q(γ_t | s_t) with the soft label γ·(1 − terminal_t) (paper appendix) as a
        # binary cross-entropy on the logit, averaged over B and L; weight discount_scale.
        label = cfg.discount * (1 - batch["terminal"].float())         # [B, L]
        discount_ll = -F.binary_cross_entropy_with_logits(wm.discount(feat), label)
        loss = loss - cfg.discount_scale * discount_ll
        obs_metric["model/discount_loss"] = -discount_ll
    prior_ent = (torch.log(s["prior_std"]) + 0.5 * math.log(2 * math.pi * math.e)).sum(-1)
    post_ent = (torch.log(s["post_std"]) + 0.5 * math.log(2 * math.pi * math.e)).sum(-1)
    metrics = {"model/loss": loss, **obs_metric, "model/reward_loss": -reward_ll, "model/kl": kl,
               "model/prior_entropy": prior_ent.mean(), "model/post_entropy": post_ent.mean()}
    return loss, metrics, s["z"], s["h"]
    # END EXERCISE


def imagine(wm, actor, z, h, horizon):
    """Imagine H steps ahead from every start state with the actor in the loop (Sec. 3).
    z [N, Z], h [N, D] → feats of s_1 … s_H: [H, N, F], and the log-densities of the actions
    a_0 … a_{H−1} that led there, log q_φ(a_τ | s_τ): [H, N] (one step behind the feats).
    [official code] The actor sees its input state with the gradient stopped; the gradient of
    Eq. 7 reaches φ through the action a_τ and the imagined transitions that follow it. Each
    step calls actor(sg(cat(z, h))) (a sample) and then wm.rssm.imagine_step(z, h, a)."""
    # EXERCISE imagine: H times: actor on sg(s_τ), then rssm.imagine_step; stack feats, log-probs
    feats, log_probs = [], []
    for _ in range(horizon):
        action, log_prob = actor(torch.cat([z, h], -1).detach())    # (Eq. 3) a_τ ~ q_φ(a | s_τ)
        z, h = wm.rssm.imagine_step(z, h, action)                   # s_{τ+1} ~ q(s | s_τ, a_τ)
        feats.append(torch.cat([z, h], -1))
        log_probs.append(log_prob)
    return torch.stack(feats, 0), torch.stack(log_probs, 0)
    # END EXERCISE


def actor_loss(wm, actor, value_model, z, h, cfg, return_scale=None):
    """(Eq. 7) max_φ E[Σ_{τ=t}^{t+H} V_λ(s_τ)], minimised as its negative.
    Start states: every posterior state of the batch, z [..., Z], h [..., D] (e.g. [B, L, ·]),
    flattened to N = B·L starts with the gradient stopped [official code]. The target is V_λ
    (Eq. 6), or by cfg.value_estimate V_R (Eq. 4, "reward") or V_N^k (Eq. 5, "nstep"). Two
    options beyond the paper, off by default (Part II): return_scale (DreamerV3's ReturnScale)
    and cfg.actor_entropy = η. Returns (loss, feats [H, N, F], returns [H−1, N], weights
    [H−1, N], metrics): 0-d actor/loss, actor/entropy, behaviour/imagined_reward and
    behaviour/return (and actor/return_scale, S, with a return scale)."""
    # EXERCISE actor_loss: imagine from sg(starts); V_λ of s_1…s_{H−1}; −mean(w_τ·V_λ)
    z, h = z.detach().reshape(-1, z.shape[-1]), h.detach().reshape(-1, h.shape[-1])  # [N, ·]
    feats, log_probs = imagine(wm, actor, z, h, cfg.horizon)
    reward = wm.reward(feats)                                        # mean r(s_τ): [H, N]
    value = value_model(feats)                                       # v_ψ(s_τ):    [H, N]
    if wm.discount is None:
        discount = cfg.discount * torch.ones_like(reward)            # γ (no early ends on DMC)
    else:   # (paper appendix) the predicted discount of continuing after s_τ, in [0, γ]
        discount = torch.sigmoid(wm.discount(feats))                 # [H, N]
    if cfg.value_estimate == "reward":                               # (Eq. 4), an ablation
        returns = reward_sum(reward)[:-1]                            # [H−1, N]
    elif cfg.value_estimate == "nstep":                              # (Eq. 5), k = nstep_k or H
        returns = nstep_return(reward[:-1], value[:-1], discount[:-1], value[-1],
                               cfg.nstep_k or cfg.horizon)            # [H−1, N]
    else:
        # (Eq. 6) [official code] returns for s_1 … s_{H−1}; v(s_H) is the bootstrap. [H−1, N]
        returns = lambda_return(reward[:-1], value[:-1], discount[:-1], value[-1], cfg.lam)
    # [official code] weight step τ by γ^(τ−1) (the cumulative product of discounts, starting
    # at 1, gradient stopped), and average over steps and starts where Eq. 7 sums. [H−1, N]
    weights = torch.cumprod(torch.cat([torch.ones_like(discount[:1]), discount[:-2]], 0), 0)
    weights = weights.detach()
    loss = -(weights * returns).mean()
    if return_scale is not None:                                     # not in the paper
        loss = loss / return_scale(returns)                          # ÷ max(1, S)
    # Not in the paper (η = 0): the entropy bonus −η·E[−ln q_φ(a_τ | s_τ)] (Part II, "Options")
    entropy = -log_probs.mean()                                      # over [H, N]
    loss = loss - cfg.actor_entropy * entropy
    metrics = {"actor/loss": loss, "actor/entropy": entropy.detach(),
               "behaviour/imagined_reward": reward.detach().mean(),
               "behaviour/return": returns.detach().mean()}
    if return_scale is not None:
        metrics["actor/return_scale"] = return_scale.scale.clone()  # S (the divisor: max(1, S))
    return loss, feats, returns, weights, metrics
    # END EXERCISE


def value_loss(value_model, feats, returns, weights):
    """(Eq. 8) min_ψ E[Σ_τ ½‖v_ψ(s_τ) − V_λ(s_τ)‖²], with the target V_λ gradient-stopped and
    the states detached: the value loss trains ψ alone. [official code] Step τ weighted by
    w_τ = γ^(τ−1), and averaged where Eq. 8 sums. feats [H, N, F] (v on feats[:−1], the states
    the returns belong to), returns and weights [H−1, N]. → (loss, metrics with 0-d tensors
    value/loss and value/mean, the mean of v)."""
    # EXERCISE value_loss: ½·(v_ψ(sg(s_τ)) − sg(V_λ))², weighted by w_τ, then the mean
    v = value_model(feats[:-1].detach())                             # [H−1, N]
    target = returns.detach()                                        # sg(V_λ)
    loss = (weights * 0.5 * (v - target) ** 2).mean()
    return loss, {"value/loss": loss, "value/mean": v.detach().mean()}
    # END EXERCISE


class Dreamer:
    """World model θ, actor φ, value model ψ, and one Adam optimiser each (paper Sec. 6)."""

    def __init__(self, cfg, action_dim, device="cpu", obs_shape=(3, 64, 64)):
        self.cfg, self.device, self.action_dim = cfg, torch.device(device), action_dim
        self.world_model = WorldModel(cfg, action_dim, obs_shape).to(self.device)
        self.actor = ACTORS[cfg.actor_dist](cfg, action_dim).to(self.device)
        self.value = ValueModel(cfg).to(self.device)
        # None unless --return_norm percentile (DreamerV3's, not in the paper)
        self.return_scale = RETURN_NORMS[cfg.return_norm]()
        if self.return_scale is not None:
            self.return_scale.to(self.device)
        adam = lambda module, lr: torch.optim.Adam(module.parameters(), lr, eps=cfg.adam_eps)
        self.model_opt = adam(self.world_model, cfg.model_lr)
        self.actor_opt = adam(self.actor, cfg.actor_lr)
        self.value_opt = adam(self.value, cfg.value_lr)

    def _backward(self, loss, opt):
        opt.zero_grad(set_to_none=True)
        loss.backward()

    def _apply(self, module, opt):
        """Clip the gradients to global norm grad_clip (paper Sec. 6), then one Adam step."""
        norm = nn.utils.clip_grad_norm_(module.parameters(), self.cfg.grad_clip)
        opt.step()
        return norm

    def _step(self, loss, module, opt):
        self._backward(loss, opt)
        return self._apply(module, opt)

    def update_world_model(self, batch, step=True):
        """Algorithm 1, dynamics learning: gradients of Eq. 10, and (if step) one Adam step.
        → posterior states z [B, L, Z], h [B, L, D] (detached) and metrics."""
        batch = {**batch, "reward": model_reward(self.world_model, batch["reward"])}
        loss, metrics, z, h = world_model_loss(self.world_model, batch, self.cfg)
        self._backward(loss, self.model_opt)
        if step:
            metrics["model/grad_norm"] = self._apply(self.world_model, self.model_opt)
        return z.detach(), h.detach(), metrics

    def update_actor(self, z, h):
        """Algorithm 1, behaviour learning (actor): one Adam step on Eq. 7 from every posterior
        state, N = B·L starts. World model and value model stay fixed."""
        if self.world_model.discount is not None:
            # [official code] the last posterior state of each chunk is no start: it may be
            # the terminal one, after which nothing should be imagined.
            z, h = z[:, :-1], h[:, :-1]                               # [B, L−1, ·]
        with frozen(self.world_model, self.value):
            loss, feats, returns, weights, metrics = actor_loss(
                self.world_model, self.actor, self.value, z, h, self.cfg, self.return_scale)
            metrics.update(actor_diagnostics(self.actor, z, h))      # not in the paper
            metrics["actor/grad_norm"] = self._step(loss, self.actor, self.actor_opt)
        return feats.detach(), returns.detach(), weights, metrics

    def update_value(self, feats, returns, weights):
        """Algorithm 1, behaviour learning (value): one Adam step on Eq. 8. (The V_R ablation,
        --value_estimate reward, still trains v_ψ here, towards V_R, though its actor never
        reads it.)"""
        loss, metrics = value_loss(self.value, feats, returns, weights)
        metrics["value/grad_norm"] = self._step(loss, self.value, self.value_opt)
        return metrics

    def train_step(self, batch):
        """One of Algorithm 1's C updates: dynamics learning (the batch's model states s_t and
        Eq. 10's gradient), then behaviour learning (imagine from each s_t; an actor step on
        Eq. 7, a value step on Eq. 8). → metrics (tensors). [official code] All three losses
        see the parameters from before this update: the world model's gradients are computed
        first, but its Adam step comes after imagination, so behaviour is learned in the same
        model that produced the start states."""
        z, h, metrics = self.update_world_model(batch, step=False)
        feats, returns, weights, actor_metrics = self.update_actor(z, h)
        metrics.update(actor_metrics)
        metrics.update(self.update_value(feats, returns, weights))
        metrics["model/grad_norm"] = self._apply(self.world_model, self.model_opt)   # θ last
        return {k: v.detach() for k, v in metrics.items()}

    @torch.no_grad()
    def act(self, obs, state, explore, updates=0):
        """Algorithm 1, environment interaction: compute s_t ~ p(s_t | s_{t−1}, a_{t−1}, o_t)
        from the new image, then a_t ~ q_φ(a_t | s_t) (+ exploration when exploring: the
        actor's explore, Gaussian noise or ε-greedy after `updates` updates; else the actor's
        evaluation action: its mode, ε-greedy with ε = epsilon_eval for discrete actions).
        obs uint8 [3, 64, 64]; state = (z, h, previous action) or None at an episode start."""
        wm = self.world_model
        if state is None:
            z, h = wm.rssm.initial(1, self.device)
            state = (z, h, torch.zeros(1, self.action_dim, device=self.device))
        z, h, prev_action = state
        obs = torch.as_tensor(obs, device=self.device)[None]
        embed = wm.encoder(preprocess(obs, wm.state_transform))
        h, _, _ = wm.rssm.prior(z, h, prev_action)
        mean, std = wm.rssm.posterior(h, embed)
        z = mean + std * torch.randn_like(std)
        action, _ = self.actor(torch.cat([z, h], -1), sample=explore)
        if explore:
            action = self.actor.explore(action, self.cfg, updates)
        else:           # the mode; discrete actions: ε-greedy with a tiny ε [paper's TF1 code]
            action = self.actor.evaluation(action, self.cfg)
        return action[0].cpu().numpy(), (z, h, action)

    def modules(self):
        modules = {"world_model": self.world_model, "actor": self.actor, "value": self.value}
        if self.return_scale is not None:
            modules["return_scale"] = self.return_scale        # its S goes into the checkpoint
        return modules

    def optimisers(self):
        return {"model_opt": self.model_opt, "actor_opt": self.actor_opt,
                "value_opt": self.value_opt}


# ============================================================================================
# Replay buffer: the dataset D of Algorithm 1, whole episodes sampled as chunks of L steps
# ============================================================================================

class ReplayBuffer:
    """The dataset D of Algorithm 1: whole episodes, one row per time step, row t = (a_{t−1}, r_t,
    o_t, whether o_t is terminal); row 0 has a zero action and reward:
        obs uint8 [T+1, 3, 64, 64], action float32 [T+1, A], reward float32 [T+1],
        terminal bool [T+1] (only on the last row of an episode that really ended, a game over
        or a lost life; a time limit is no end).
    With a directory, each episode is also written there as NNNNNN.npz, with `env_steps`, the
    env steps it played. Not in the paper, which keeps every episode: capacity = N > 0 keeps at
    most N transitions in memory for sampling; the oldest episodes leave memory, their files
    stay (DreamerV2 bounds its replay alike, at 2·10⁶). num_episodes and num_steps count all."""

    def __init__(self, directory=None, seed=0, capacity=0, action_repeat=1):
        self.directory = Path(directory) if directory is not None else None
        self.capacity = capacity     # transitions held in memory; 0: no bound
        self.action_repeat = action_repeat   # env steps per transition, where not stored
        self.episodes = []           # the newest episodes, in order: what sample() draws from
        self.lengths = []            # transitions of every episode of the run, oldest first
        self.env_steps = []          # env steps it played, parallel to lengths
        self.paths = []              # its file (None without a directory), parallel to lengths
        self.in_memory = 0           # transitions in self.episodes
        self.rng = np.random.default_rng(seed)
        self.next_index = 0          # file number of the next episode; never reuses a name

    def add(self, episode, env_steps=None):
        """Keep an episode (and write it); env_steps: what it played (default rows − 1 times R)."""
        episode = {k: np.asarray(v) for k, v in episode.items()}
        if env_steps is None:
            env_steps = (len(episode["reward"]) - 1) * self.action_repeat
        path = None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"{self.next_index:06d}.npz"
            save_atomically(path, lambda f: np.savez_compressed(f, **episode,
                                                                env_steps=np.int64(env_steps)))
        self.next_index += 1
        self.append(episode, path, env_steps)

    def append(self, episode, path, env_steps=None):
        length = len(episode["reward"]) - 1
        self.episodes.append(episode)
        self.lengths.append(length)
        self.env_steps.append(length * self.action_repeat if env_steps is None else env_steps)
        self.paths.append(path)
        self.in_memory += length
        # Past the capacity, the oldest episodes leave memory; the newest always stays.
        while self.capacity and self.in_memory > self.capacity and len(self.episodes) > 1:
            self.in_memory -= len(self.episodes.pop(0)["reward"]) - 1

    def can_sample(self, length):
        """Whether some episode has the `length` rows that one chunk of sample() needs."""
        return any(len(e["reward"]) >= length for e in self.episodes)

    def sample(self, batch_size, length):
        """B chunks of L consecutive rows: an episode uniformly at random, then a start from
        window_start (uniform [official code]), both drawn with self.rng (its state is checkpointed, so a
        resumed run samples as an unbroken one). A chunk never crosses an episode boundary.
        → dict of arrays obs [B, L, 3, 64, 64] (uint8), action [B, L, A], reward [B, L],
        terminal [B, L]."""
        # EXERCISE replay_sample: B times: an episode with ≥ L rows (uniform), self.window_start; np.stack
        eligible = [e for e in self.episodes if len(e["reward"]) >= length]
        if not eligible:
            raise ValueError(f"no episode in the replay has {length} steps to sample")
        chunks = []
        for _ in range(batch_size):
            episode = eligible[self.rng.integers(len(eligible))]
            start = self.window_start(episode, length)
            chunks.append({k: v[start:start + length] for k, v in episode.items()})
        return {k: np.stack([c[k] for c in chunks]) for k in chunks[0]}
        # END EXERCISE

    def window_start(self, episode, length):
        """The first row of a chunk of `length` rows: uniform over the episode's whole windows
        [official code], drawn with self.rng."""
        return self.rng.integers(len(episode["reward"]) - length + 1)

    # -- not in the paper: a run's files read back (resume), and counts for logs and checks --
    @staticmethod
    def read(path, keys=("obs", "action", "reward", "terminal")):
        """One episode file → dict of its arrays (only `keys`; env_steps only if stored). Files
        written before `terminal` was stored come from DMC, where no episode ends early: never
        terminal."""
        with np.load(path) as data:
            episode = {k: data[k] for k in keys
                       if k != "terminal" and (k != "env_steps" or k in data.files)}
            if "terminal" in keys:
                episode["terminal"] = (data["terminal"] if "terminal" in data.files
                                       else np.zeros(len(data["reward"]), bool))
        return episode

    def load(self):
        """Read the directory's episode files back, in order: the lengths of all, the arrays of
        the newest that fit the capacity. Raises UserError naming a file that cannot be read;
        an allocation failure (MemoryError and the like) passes through as it is: the file is
        fine, the machine is short of memory."""
        if self.directory is None or not self.directory.exists():
            return
        paths = sorted(self.directory.glob("*.npz"))
        counts = [self.checked(path, ("reward", "env_steps")) for path in paths]
        lengths = [len(c["reward"]) - 1 for c in counts]
        # (files written before env_steps was stored: every action played its R env steps)
        played = [int(c["env_steps"]) if "env_steps" in c else n * self.action_repeat
                  for c, n in zip(counts, lengths)]
        first, held = len(paths), 0                   # the newest suffix within the capacity
        while first > 0 and (first == len(paths) or not self.capacity
                             or held + lengths[first - 1] <= self.capacity):
            first -= 1
            held += lengths[first]
        for i, path in enumerate(paths):
            if i >= first:
                self.append(self.checked(path), path, played[i])
            else:                                     # counted, left on disk
                self.lengths.append(lengths[i])
                self.env_steps.append(played[i])
                self.paths.append(path)
            if path.stem.isdigit():
                self.next_index = max(self.next_index, int(path.stem) + 1)

    def checked(self, path, keys=("obs", "action", "reward", "terminal")):
        try:
            return self.read(path, keys)
        except Exception as e:
            if out_of_memory(e):
                raise
            raise UserError(f"cannot read episode file {path} ({one_line(e)}); "
                            f"move it out of the way to resume without it") from None

    def episode(self, i):
        """The i-th episode of the run (0 = the first), from memory or else from its file."""
        first = len(self.lengths) - len(self.episodes)
        return self.episodes[i - first] if i >= first else self.checked(self.paths[i])

    @property
    def num_episodes(self):
        """Episodes of the run, in memory or not."""
        return len(self.lengths)

    @property
    def num_steps(self):
        """Agent steps (transitions) of the run, in memory or not: an episode of T+1 rows holds T."""
        return sum(self.lengths)

    @property
    def num_env_steps(self):
        """Env steps the run's episodes played, in memory or not."""
        return sum(self.env_steps)

    def sampleable(self, length):
        """The fraction of the transitions in memory that sample() can draw: those in episodes
        of ≥ `length` rows (a shorter episode, e.g. a game over, fits no chunk)."""
        held = [len(e["reward"]) - 1 for e in self.episodes]
        return sum(n for n in held if n + 1 >= length) / max(1, sum(held))


# ============================================================================================
# Environments: DeepMind Control Suite from pixels; Atari (appendix: discrete actions, early ends)
# ============================================================================================

# The environment interface, all that run_episode, the Trainer and play() rely on (DMCEnv,
# AtariEnv below and GymEnv in Part II have it; README: "Your own environment"):
#   reset() → obs                           the first observation of a new episode
#   step(action) → (obs, reward, done, terminal)
#       action   float [A]: in [−1, 1]^A (continuous), or one-hot (discrete: its argmax is taken)
#       reward   float, summed over the R = action_repeat env steps one action is repeated for
#       done     the episode is over: a real end or a time limit
#       terminal it really ended (game over, a pole that fell): the discount predictor's label
#                0; a time limit is done but never terminal
#   obs          uint8 [3, 64, 64] pixels (--obs pixels) or float32 [O] (--obs state)
#   obs_shape    (3, 64, 64) or (O,);  action_dim A;  discrete: one-hot actions or not
#   max_env_steps  the longest episode in env steps;  can_end_early  whether done can come sooner
#   steps        env steps played in the current episode: the frames really played (an end
#                inside an action's repeat stops the repeat); --steps and the schedules count these
#   sample_action()  a uniformly random action (the seed episodes), from numpy's global RNG
#   random_state   its RNG, with get_state()/set_state() (checkpointed: a resumed run's episodes
#                  start where an unbroken run's would)


class DMCEnv:
    """A DMC task from 64×64 pixels with action repeat and a time limit, counted in env steps.
    reset() → obs; step(action in [−1, 1]^A) → (obs, reward summed over the repeats, done).
    obs is uint8 [3, 64, 64]. Reaching the time limit ends the episode but is not terminal:
    there is no discount to learn on DMC (paper Sec. 6; [official code] 'pcont' off).
    Not in the paper: obs="state" gives the task's own observation instead, float32 [O]: the
    arrays of dm_control's observation dict, each flattened, concatenated in the order of
    observation_spec() (reacher: position 2, to_target 2, velocity 2); nothing is rendered
    then, though render() still draws the frame a person would see."""

    def __init__(self, task, action_repeat=2, time_limit=1000, size=64, seed=0,
                 shadow_size=2048, obs="pixels"):
        from dm_control import suite
        from dm_control.rl.control import PhysicsError
        import mujoco
        self.task, self.physics_error = task, (PhysicsError, mujoco.FatalError)
        domain, name = parse_task(task)
        self.env = suite.load(domain, name, task_kwargs={"random": seed})
        # speed, opt-in (--shadow_size): the software renderer spends most of a 64x64 frame on
        # the 2048x2048 shadow map. 256 renders reacher 1.7x faster (35 -> 21 ms a frame on a
        # 2-core AVX2 CPU); 0.24% of the pixels differ, by 0.04 grey levels on average.
        self.env.physics.model.vis.quality.shadowsize = shadow_size
        self.camera = 2 if domain == "quadruped" else 0     # [official code] camera choice
        self.action_repeat, self.time_limit, self.size = action_repeat, time_limit, size
        # Episodes end at our time limit or the task's own, whichever comes first.
        self.max_env_steps = int(min(time_limit, self.env._step_limit))
        spec = self.env.action_spec()
        self.low, self.high = spec.minimum, spec.maximum
        self.action_dim = spec.shape[0]
        self.obs_mode, self.steps = obs, 0
        state_size = sum(int(np.prod(v.shape)) for v in self.env.observation_spec().values())
        self.obs_shape = (3, size, size) if obs == "pixels" else (state_size,)

    def render(self):
        image = self.env.physics.render(self.size, self.size, camera_id=self.camera)
        return np.ascontiguousarray(image.transpose(2, 0, 1))   # [H, W, 3] → [3, H, W]

    def observe(self, time_step):
        """What the agent sees: the rendered image, or (state) the flattened observation dict."""
        if self.obs_mode == "pixels":
            return self.render()
        return np.concatenate([np.asarray(v, np.float32).ravel()
                               for v in time_step.observation.values()])   # [O]

    def reset(self):
        self.steps = 0
        try:
            time_step = self.env.reset()
        except self.physics_error as e:
            raise SimulatorError(f"the simulator failed to reset {self.task} "
                                 f"({one_line(e)})") from None
        return self.observe(time_step)

    can_end_early, discrete = False, False

    def sample_action(self):
        """A uniformly random action in [−1, 1]^A (the seed episodes), from numpy's global RNG."""
        return np.random.uniform(-1, 1, self.action_dim)

    def step(self, action):
        """→ (obs, reward, done, terminal = False: DMC tasks only stop at their time limit).
        Raises Diverged for a non-finite action (nothing non-finite reaches MuJoCo), and
        SimulatorError, with the episode's env step, when MuJoCo fails."""
        action = np.asarray(action, np.float64)
        if not np.isfinite(action).all():
            raise Diverged(f"the policy sent a non-finite action ({np.sum(~np.isfinite(action))} "
                           f"of {action.size} entries) to {self.task} at env step {self.steps} "
                           f"of an episode")
        # Map [−1, 1] to the task's action bounds (nearly all DMC tasks use [−1, 1] already).
        action = self.low + (action + 1) / 2 * (self.high - self.low)
        reward, done = 0.0, False
        for _ in range(self.action_repeat):
            try:
                ts = self.env.step(action)
            except self.physics_error as e:
                raise SimulatorError(f"the simulator failed on {self.task} at env step "
                                     f"{self.steps} of an episode ({one_line(e)})") from None
            reward += ts.reward or 0.0
            self.steps += 1
            done = ts.last() or self.steps >= self.time_limit
            if done:
                break
        return self.observe(ts), reward, done, False

    @property
    def random_state(self):
        return self.env.task.random     # the task's numpy RandomState (initial positions, …)


def resize64(frame):
    """A frame uint8 [H, W, 3] → uint8 [3, 64, 64], resized by bilinear interpolation with
    antialiasing (torch; no image library needed)."""
    image = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
    image = F.interpolate(image, size=(64, 64), mode="bilinear", antialias=True)
    return image[0].round().clamp(0, 255).to(torch.uint8).numpy()


class AtariEnv:
    """An Atari game from 64×64 RGB pixels, through ale-py's ALEInterface (no gym layer), with
    [official code] the authors' wrapper settings: sticky actions (the last action repeats with
    probability 0.25), action repeat R = 4 with the rewards summed and the last two frames
    max-pooled (sprites flicker), 1–30 random no-ops after each reset, and a lost life ending
    the episode (life_done; training only here, as in the paper's TF1 code, so evaluation plays
    every life). Episodes stop after time_limit env steps (frames; 108,000 = ALE's cap), which
    is no terminal. Actions are one-hot over the game's minimal action set. The game restarts
    at every reset [official code], after a lost life too. [paper's TF1 code]
    (MinimumDuration) A life lost before agent step min_length does not end the episode (the
    game goes on with the next life, the row is not terminal), so that every training episode
    but a game over holds a whole replay chunk (min_length = batch_length)."""

    can_end_early, discrete, obs_shape = True, True, (3, 64, 64)
    noops, sticky = 30, 0.25                                  # [official code]

    def __init__(self, game, action_repeat=4, time_limit=108_000, seed=0, life_done=True,
                 min_length=0):
        from ale_py import ALEInterface, LoggerMode, roms
        ALEInterface.setLoggerMode(LoggerMode.Error)
        self.task, self.life_done, self.min_length = f"atari_{game}", life_done, min_length
        self.ale = ALEInterface()
        self.ale.setInt("random_seed", seed % 2 ** 31)          # the sticky actions' RNG
        self.ale.setFloat("repeat_action_probability", self.sticky)
        self.ale.loadROM(roms.get_rom_path(game))
        self.actions = list(self.ale.getMinimalActionSet())
        self.action_dim = len(self.actions)
        self.action_repeat, self.time_limit = action_repeat, time_limit
        self.max_env_steps = time_limit
        self.random = np.random.RandomState(seed)               # the no-ops at reset
        height, width = self.ale.getScreenDims()
        self.frames = np.zeros((2, height, width, 3), np.uint8)  # the last two frames
        self.steps, self.agent_steps, self.lives = 0, 0, 0

    def sample_action(self):
        """A uniformly random one-hot action (the seed episodes), from numpy's global RNG."""
        return np.eye(self.action_dim, dtype=np.float32)[np.random.randint(self.action_dim)]

    def observe(self, frames):
        """The max over the given frames [n, 210, 160, 3] → uint8 [3, 64, 64] (resize64)."""
        return resize64(frames.max(0))

    def reset(self):
        self.steps = self.agent_steps = 0
        self.ale.reset_game()
        for _ in range(self.random.randint(1, self.noops + 1)):  # [official code] 1–30 no-ops
            self.ale.act(self.actions[0])                         # (the minimal set's NOOP)
            if self.ale.game_over():
                self.ale.reset_game()
        self.lives = self.ale.lives()
        self.ale.getScreenRGB(self.frames[0])
        return self.observe(self.frames[:1])

    def step(self, action):
        """action: one-hot [A] (its largest entry is the action taken) → (obs, reward summed
        over the R frames, done, terminal). Terminal: game over, or with life_done a lost life;
        the time limit is done but not terminal. Raises Diverged for a non-finite action."""
        action = np.asarray(action, np.float64)
        if not np.isfinite(action).all():
            raise Diverged(f"the policy sent a non-finite action to {self.task} at env step "
                           f"{self.steps} of an episode")
        a = self.actions[int(action.argmax())]
        reward, terminal, seen = 0.0, False, 0
        self.agent_steps += 1
        life_ends = self.life_done and self.agent_steps >= self.min_length   # [paper's TF1 code]
        for _ in range(self.action_repeat):
            reward += self.ale.act(a)
            self.steps += 1
            self.ale.getScreenRGB(self.frames[seen % 2])
            seen += 1
            # [official code] the lives are remembered after every frame, so that a life lost
            # after a bonus life (3 → 4 → 3) ends the episode too
            lives, remembered, self.lives = self.ale.lives(), self.lives, self.ale.lives()
            terminal = self.ale.game_over() or (life_ends and lives < remembered)
            if terminal or self.steps >= self.time_limit:
                break
        done = terminal or self.steps >= self.time_limit
        return self.observe(self.frames[:min(seen, 2)]), reward, done, terminal

    @property
    def random_state(self):
        return self.random


def make_env(task, action_repeat=2, time_limit=1000, seed=0, shadow_size=2048, training=True,
             obs="pixels", min_length=0):
    """The public entry point for environments: DMCEnv, AtariEnv for atari_GAME (where a lost
    life ends only training episodes, training=True, and only from agent step min_length on),
    or GymEnv for gym:ID; obs: pixels or state. Raises UserError for an unknown task and for
    a simulator that cannot be set up (e.g. dm_control's ImportError or RuntimeError when no
    renderer works)."""
    try:
        if is_atari(task):
            return AtariEnv(parse_task(task)[1], action_repeat=action_repeat,
                            time_limit=time_limit, seed=seed, life_done=training,
                            min_length=min_length)
        if is_gym(task):
            return GymEnv(task, action_repeat=action_repeat, time_limit=time_limit, seed=seed,
                          obs=obs)
        return DMCEnv(task, action_repeat=action_repeat, time_limit=time_limit, seed=seed,
                      shadow_size=shadow_size, obs=obs)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot create the environment {task} ({one_line(e)})") from None


def run_episode(env, policy):
    """Play one episode. policy(obs, state) → (action, state). → (episode dict, return)."""
    obs, state = env.reset(), None
    rows = {"obs": [obs], "action": [np.zeros(env.action_dim, np.float32)], "reward": [0.0],
            "terminal": [False]}
    done, total = False, 0.0
    while not done:
        action, state = policy(obs, state)
        obs, reward, done, terminal = env.step(action)
        rows["obs"].append(obs)                        # row t: o_t …
        rows["action"].append(np.asarray(action, np.float32))   # … a_{t−1} that led to it …
        rows["reward"].append(reward)                  # … r_t received with it …
        rows["terminal"].append(terminal)              # … and whether o_t ended the episode
        total += reward
    episode = {"obs": np.stack(rows["obs"]),          # uint8 pixels or float32 state
               "action": np.stack(rows["action"]).astype(np.float32),
               "reward": np.asarray(rows["reward"], np.float32),
               "terminal": np.asarray(rows["terminal"], bool)}
    return episode, total


# ============================================================================================
# Training loop (Algorithm 1): dynamics learning, behaviour learning, environment interaction
# ============================================================================================

class TrainingLoop:
    """Algorithm 1. The Trainer (Part II, "The machinery of a run") is a TrainingLoop: it holds
    what the loop works on (cfg, the agent, the replay buffer D, the environment, the counters)
    and wraps the loop in resume, signal and fault handling, checkpoints and logging."""

    def algorithm_1(self, steps):
        """Algorithm 1 from `steps` env steps (0, or where a resumed run stopped) to cfg.steps:
        training phases of C updates (dynamics and behaviour learning) alternate with episodes
        of environment interaction. → the env steps played by the end."""
        cfg, c = self.cfg, self.counters
        while steps < cfg.steps:                                    # "while not converged"
            # Dynamics learning and behaviour learning: C = train_steps updates per train_every
            # env steps [official code], the first right after the seed episodes. Phases that
            # fall due inside an episode run in collect, between actions (Atari's long episodes;
            # on DMC, 1000 env steps = train_every, they fall between episodes); after a resume,
            # those owed for episodes collected since the checkpoint run here.
            self.train_metrics = self.train_owed(steps) or self.train_metrics
            if steps >= c["next_eval"]:   # (Part II) an evaluation cut short by Ctrl-C, now owed
                self.evaluate_and_log(steps)
            # Environment interaction: one episode of a_t ~ q_φ(a_t | s_t) with exploration
            # noise; the first S episodes ("initialize dataset D with S random seed episodes")
            # act uniformly at random.
            seeding = self.seeding()
            t_env = time.perf_counter() - self.phase_seconds   # (less phases inside it)
            episode, ret = self.collect(self.env, explore=True, random_actions=seeding,
                                        train_from=None if seeding else steps)  # (+ phases due)
            self.replay.add(episode, self.env.steps)                # D ← D ∪ {(o_t, a_t, r_t)}
            if seeding and not self.seeding():
                c["next_train"] = self.env_steps()   # the first phase follows the seeding
            steps = self.after_episode(steps, episode, ret, t_env)  # (Part II) log, evaluate, save
        return steps

    def train_phase(self):
        """Dynamics learning + behaviour learning: C = train_steps updates (Dreamer.train_step),
        each on B sequences of L steps drawn from D. → the phase's mean metrics. Raises
        Diverged at the first update whose losses or gradient norms are NaN or ±inf."""
        cfg, c, metrics, start = self.cfg, self.counters, [], time.perf_counter()
        while c["phase_updates"] < cfg.train_steps:     # a phase cut by Ctrl-C resumes midway
            self.stop.check()
            batch = self.replay.sample(cfg.batch_size, cfg.batch_length)   # B × L rows from D
            batch = {k: torch.as_tensor(v, device=self.agent.device) for k, v in batch.items()}
            metrics.append(self.agent.train_step(batch))
            c["updates"] += 1
            c["phase_updates"] += 1
            self.check_update(metrics[-1])              # (Part II) NaN or ±inf: Diverged
        self.check_parameters()                         # (Part II) the last Adam step's result
        c["phase_updates"] = 0
        return self.phase_summary(metrics, start)       # (Part II) the mean metrics, the pace

    def train_owed(self, steps, due_by=None):
        """The training phases due by `due_by` env steps (default `steps`; one per train_every,
        the first right after the seed episodes), each logged at `steps`, the run's env steps
        now. → the last one's metrics, or {}."""
        cfg, c, metrics = self.cfg, self.counters, {}
        due_by = steps if due_by is None else due_by
        while due_by >= c["next_train"] and not self.seeding():   # (cheap test first: per step)
            metrics = self.train_phase()
            self.log(steps, metrics)                   # (Part II) metrics.jsonl
            self.watch_actor(metrics)                  # (Part II) is the actor stuck?
            c["next_train"] += cfg.train_every
        return metrics

    def seeding(self):
        """Algorithm 1's seed episodes: S random episodes, and then (episodes that end early,
        Atari) more until one has the batch_length rows a training chunk needs."""
        return (self.replay.num_episodes < self.cfg.seed_episodes
                or not self.replay.can_sample(self.cfg.batch_length))

    def collect(self, env, explore, random_actions=False, label=None, train_from=None):
        """Environment interaction: one episode with the policy (Dreamer.act), or uniform random
        actions. With a label, a line every EVAL_PROGRESS env steps says how far a long episode
        got. With train_from (the run's env steps before this episode), the training phases
        that fall due inside the episode run there, before the action at that env step, on the
        episodes finished before it: training every train_every env steps [official code]."""
        def policy(obs, state):
            self.stop.check()
            if train_from is not None:
                self.train_metrics = self.train_owed(train_from + env.steps) or self.train_metrics
            if label and env.steps and env.steps % EVAL_PROGRESS < self.cfg.action_repeat:
                print(f"  {label}: {env.steps:,} env steps so far", flush=True)
            if random_actions:
                return env.sample_action(), None
            return self.agent.act(obs, state, explore, self.counters["updates"])
        return run_episode(env, policy)


# ############################################################################################
# End of the paper's algorithm. Part II: what the paper does not have, each part under its own
# banner: options beyond the paper, speed, diagnostics and pictures, the machinery of a run,
# benchmark, ablations, exercises, configuration checks and main().
# ############################################################################################


# ============================================================================================
# Options beyond the paper (off by default): DreamerV2's actor, DreamerV3's return scale, the
# entropy bonus; state inputs; replay for early ends; any Gymnasium environment
# ============================================================================================

class TruncatedNormalActor(Actor):
    """Not in the paper: DreamerV2's continuous actor (Hafner et al. 2021, "Mastering Atari with
    Discrete World Models", its DMC configuration), --actor_dist trunc_normal. The action is
    drawn from a normal truncated to [−1, 1], with no tanh after the sample [DreamerV2 code]:

        q_φ(a | s) = N(a; μ, σ) / (Φ(β) − Φ(α)),   α = (−1 − μ)/σ,   β = (1 − μ)/σ,
        μ = tanh(x_μ),   σ = 2·sigmoid(x_σ / 2) + 0.1 ∈ (0.1, 2.1)

    (Φ: the standard normal CDF; x_μ, x_σ: the network's outputs.) Unlike a = tanh(u), whose
    ∂a/∂u = 1 − tanh²u vanishes once |u| ≫ 1, a sample's derivative in μ does not vanish at a
    bound, and σ ≥ 0.1. Sampling inverts the CDF (reparameterised); a is then clipped to
    ±(1 − 10⁻⁶), straight through. Where it differs from DreamerV2: it explores as the paper's
    actor does, adding N(0, expl_noise = 0.3) to the sample while collecting (Actor.explore);
    DreamerV2 adds none and explores by sampling alone: --expl_noise 0 gives that."""

    def __init__(self, cfg, action_dim):
        super().__init__(cfg, action_dim)
        self.min_std = 0.1                                  # [DreamerV2 code]

    def dist_params(self, feat):
        """feat [..., F] → the truncated normal's μ in (−1, 1) and σ in (0.1, 2.1), [..., A]."""
        mean, std = self.net(feat).chunk(2, -1)
        return torch.tanh(mean), 2 * torch.sigmoid(std / 2) + self.min_std

    def forward(self, feat, sample=True):
        """Return (action, ln q_φ(action | s)), each [..., A] and [...]; sample=False gives μ,
        the truncated normal's mode, used for evaluation."""
        mean, std = self.dist_params(feat)
        if sample:
            cdf_low = torch.special.ndtr((-1 - mean) / std)                 # Φ(α)
            mass = torch.special.ndtr((1 - mean) / std) - cdf_low           # Φ(β) − Φ(α)
            p = cdf_low + torch.rand_like(mean) * mass       # uniform between Φ(α) and Φ(β)
            eps = 1e-7                                       # Φ⁻¹(0) = −∞: keep p inside (0, 1)
            action = mean + std * torch.special.ndtri(p.clamp(eps, 1 - eps))
            clipped = action.clamp(-1 + 1e-6, 1 - 1e-6)
            action = action + (clipped - action).detach()    # straight through the clip
        else:
            action = self.mode(mean)
        return action, self.log_prob(action, mean, std).sum(-1)

    @staticmethod
    def mode(mean):
        """The truncated normal's mode, from dist_params' mean: μ itself."""
        return mean

    @staticmethod
    def log_prob(action, mean, std):
        """ln q(a) = ln N(a; μ, σ) − ln(Φ(β) − Φ(α)) per entry, for a in [−1, 1]; all [..., A].
        Φ(β) − Φ(α) > 0.32 for μ in (−1, 1) and σ < 2.1, so its logarithm is safe."""
        mass = torch.special.ndtr((1 - mean) / std) - torch.special.ndtr((-1 - mean) / std)
        x = (action - mean) / std
        return -0.5 * x ** 2 - 0.5 * math.log(2 * math.pi) - torch.log(std * mass)


# DreamerV2's actor, by --actor_dist trunc_normal, beside the paper's two (ACTORS, Part I).
ACTORS["trunc_normal"] = TruncatedNormalActor


class ReturnScale(nn.Module):
    """Not in the paper: DreamerV3's return normalisation (Hafner et al. 2023, "Mastering Diverse
    Domains through World Models", Sec. 2), --return_norm percentile. actor_loss divides Eq. 7's
    returns by max(1, S), where

        S ← 0.99·S + 0.01·(Per(R, 95) − Per(R, 5)),   S = 0 at the start,

    Per(R, p) the p-th percentile of one batch's λ-returns; S is kept in the checkpoint. Large
    returns are scaled down, small ones never up. Adam ignores a constant scale of the loss, so
    what S sets is the balance with the entropy bonus (--actor_entropy; DreamerV3: η = 3·10⁻⁴).
    [DreamerV3 code] EMAs the two percentiles apart (the same EMA of their difference) and also
    subtracts v(s_τ), a baseline its REINFORCE gradient needs and Eq. 7's does not: left out."""

    def __init__(self, decay=0.99):
        super().__init__()
        self.decay = decay
        self.register_buffer("scale", torch.zeros(()))                # S

    @torch.no_grad()
    def forward(self, returns):
        """returns [...] (any shape) → max(1, S) as a 0-d tensor, after updating S with them."""
        q = torch.tensor([0.05, 0.95], device=returns.device)
        low, high = torch.quantile(returns.detach().flatten().float(), q)   # Per(R, 5), (R, 95)
        self.scale.mul_(self.decay).add_((1 - self.decay) * (high - low))
        return self.scale.clamp(min=1.0)


# DreamerV3's return normalisation, by --return_norm percentile (RETURN_NORMS, Part I).
RETURN_NORMS["percentile"] = ReturnScale

# The entropy bonus (--actor_entropy η, default 0; DreamerV2 uses 1e-4), a term of actor_loss:
# −η·E[H], with the entropy H estimated as −ln q_φ(a_τ | s_τ) of the one sample, as in DreamerV2.
# Why it can help: once tanh saturates (|μ| ≫ 1), ∂a/∂μ = 1 − tanh²u ≈ 0 and the return no
# longer moves μ, but ∂(−η·H)/∂u = 2η·tanh u does not vanish, so it pulls u back (though the
# bound μ = s·tanh(·/s), s = actor_mean_scale, can saturate too; results/README.md: "Is the
# actor stuck?").


# State inputs (--obs state): the task's state vector instead of pixels, as DreamerV2/V3 take
# vector inputs; the paper's world model with a dense encoder and decoder.

def symlog(x):
    """sign(x)·ln(1 + |x|): the identity near 0, logarithmic for large |x| (DreamerV3)."""
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x):
    """The inverse of symlog: sign(x)·(e^|x| − 1)."""
    return torch.sign(x) * torch.expm1(x.abs())


class DenseEncoder(nn.Module):
    """Not in the paper (--obs state): the encoder for a state vector instead of an image, as
    DreamerV2/V3 encode vector inputs: 4 dense ELU layers of `units` [DreamerV2 code] (4 × 400),
    the last one's output the embedding e_t. obs [..., O] (after preprocess) → embed [..., units]."""

    def __init__(self, obs_dim, units):
        super().__init__()
        self.net = nn.Sequential(mlp(obs_dim, units, 3, units), nn.ELU())
        self.embed_size = units

    def forward(self, obs):
        return self.net(obs)                            # [..., O] → [..., units]


class DenseDecoder(nn.Module):
    """Not in the paper (--obs state): the observation model q(o_t | s_t) for a state vector, a
    unit-variance Gaussian whose mean is 4 dense ELU layers of `units` → O [DreamerV2 code], so
    that J_O = −½‖o_t − ô_t‖² is Eq. 10's term exactly as for images, summed over O entries."""

    def __init__(self, feat_size, obs_dim, units):
        super().__init__()
        self.net = mlp(feat_size, units, 4, obs_dim)

    def forward(self, feat):
        return self.net(feat)                           # [..., F] → mean [..., O]


# Replay for tasks that end early (Atari, gym: tasks): their ends sampled as often as stored.

class EndsReplayBuffer(ReplayBuffer):
    """Not in the paper: the replay for tasks whose episodes can end early (Atari, gym: tasks).
    [DreamerV2 code] (pre-release: oversample_ends) With uniform starts, a chunk holds an
    episode's last row (its terminal, the discount predictor's only label 0) once in T − L + 2
    draws, so terminal rows reach batches about L times less often than they are stored. Here,
    in an episode that really ended (its last row terminal), the start is drawn uniformly over
    all T + 1 rows and then moved back to the last whole window, min(u, T + 1 − L): the last
    window comes with probability L / (T + 1), and the terminal row reaches batches at its
    stored rate within the episode. Episodes cut by a time limit are sampled as by
    ReplayBuffer. Chunks stay inside one episode; episodes still need L rows (AtariEnv's
    min_length sees to that)."""

    def window_start(self, episode, length):
        """As ReplayBuffer's, but min(u, T + 1 − L), u uniform over all T + 1 rows, in an
        episode whose last row is terminal."""
        rows = len(episode["reward"])
        if not episode["terminal"][-1]:
            return super().window_start(episode, length)
        return min(self.rng.integers(rows), rows - length)            # the end oversampled


# Any Gymnasium environment (--env gym:ID, or gym:module:ID for your own; README: "Your own
# environment"), from pixels or its state vector.

class _GeneratorState:
    """A numpy Generator's state behind RandomState's get_state()/set_state()."""

    def __init__(self, generator_of):
        self.generator_of = generator_of        # () → the Generator (looked up when used)

    def get_state(self):
        return self.generator_of().bit_generator.state

    def set_state(self, state):
        self.generator_of().bit_generator.state = state


@functools.lru_cache(maxsize=None)
def probe_gym(task):
    """What a Gymnasium task 'gym:ID' offers, from one gymnasium.make(ID) (ID may be
    'module:Name', which imports the user's module first, where it registers Name) → dict with
    discrete (bool), action_dim, max_episode_steps (its own time limit, or None), state (its
    observation space is a Box: --obs state works) and pixels (it renders rgb_array frames:
    --obs pixels works). Raises UserError, one line, for anything this agent cannot use."""
    try:
        import gymnasium
    except ImportError:
        raise UserError("gym: tasks need the package gymnasium (pip install -r "
                        "requirements.txt)") from None
    env_id = task[len("gym:"):]
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())     # so that gym:mymodule:Name finds ./mymodule.py
    try:
        env = gymnasium.make(env_id)
    except Exception as e:
        raise UserError(f"cannot make the Gymnasium environment {env_id!r} ({one_line(e)})") \
            from None
    try:
        space = env.action_space
        if isinstance(space, gymnasium.spaces.Discrete):
            discrete, action_dim = True, int(space.n)
        elif isinstance(space, gymnasium.spaces.Box) and len(space.shape) == 1:
            if not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
                raise UserError(f"{task}'s action bounds are not finite ({space}); the actor's "
                                f"actions in [−1, 1] are scaled onto the bounds")
            discrete, action_dim = False, int(space.shape[0])
        else:
            raise UserError(f"{task} has the action space {space}; this agent takes Discrete "
                            f"or a one-dimensional Box")
        obs_space = env.observation_space
        return {"discrete": discrete, "action_dim": action_dim,
                "max_episode_steps": env.spec.max_episode_steps if env.spec else None,
                "state": isinstance(obs_space, gymnasium.spaces.Box),
                "observation_space": str(obs_space),
                "pixels": "rgb_array" in env.metadata.get("render_modes", ())}
    finally:
        with contextlib.suppress(Exception):
            env.close()


class GymEnv:
    """Not in the paper: any Gymnasium environment, --env gym:ID (gymnasium.make(ID); ID may be
    'module:Name', whose module registers your own environment). Box actions: the actor's
    [−1, 1]^A scaled onto the bounds; Discrete: one-hot actions (the one-hot actor). --obs state:
    the observation (a Box) flattened to float32 [O]; --obs pixels: env.render() (rgb_array)
    resized to 64×64 like Atari's frames. terminated is terminal; truncated (the environment's
    time limit, or ours: time_limit) is done but not terminal. Seeded once, with reset(seed=...)
    when made; later episodes go on with the environment's own RNG (checkpointed)."""

    can_end_early = True                 # unknown in general: a Gymnasium env may end any time

    def __init__(self, task, action_repeat=2, time_limit=1000, seed=0, obs="state"):
        import gymnasium
        self.task, self.obs_mode = task, obs
        self.info = probe_gym(task)
        # rgb_array frames are drawn only when asked: every step with --obs pixels, for a
        # person's video (plot.py) with --obs state.
        self.env = gymnasium.make(task[len("gym:"):], max_episode_steps=time_limit,
                                  **({"render_mode": "rgb_array"} if self.info["pixels"] else {}))
        self.discrete, self.action_dim = self.info["discrete"], self.info["action_dim"]
        if not self.discrete:
            self.low = self.env.action_space.low.astype(np.float64)
            self.high = self.env.action_space.high.astype(np.float64)
        self.action_repeat, self.time_limit, self.max_env_steps = action_repeat, time_limit, \
            time_limit
        self.random_state = _GeneratorState(lambda: self.env.unwrapped.np_random)
        first, _ = self.env.reset(seed=seed)          # the one seeding; its episode is unused
        self.obs_shape = np.shape(self.observe(first))
        self.steps = 0

    def observe(self, obs):
        if self.obs_mode == "state":
            return np.asarray(obs, np.float32).ravel()                 # [O]
        return self.render()

    def render(self):
        """The frame a person would see: env.render() (rgb_array) at 64×64, uint8 [3, 64, 64]."""
        if not self.info["pixels"]:
            raise UserError(f"{self.task} does not render rgb_array frames")
        return resize64(np.asarray(self.env.render()))                 # [H, W, 3] uint8

    def sample_action(self):
        """A uniformly random action (the seed episodes), from numpy's global RNG."""
        if self.discrete:
            return np.eye(self.action_dim, dtype=np.float32)[np.random.randint(self.action_dim)]
        return np.random.uniform(-1, 1, self.action_dim)

    def reset(self):
        self.steps = 0
        obs, _ = self.env.reset()
        return self.observe(obs)

    def step(self, action):
        """→ (obs, reward summed over the repeats, done, terminal = terminated). Raises Diverged
        for a non-finite action."""
        action = np.asarray(action, np.float64)
        if not np.isfinite(action).all():
            raise Diverged(f"the policy sent a non-finite action to {self.task} at env step "
                           f"{self.steps} of an episode")
        if self.discrete:
            action = int(action.argmax()) + int(self.env.action_space.start)
        else:
            action = (self.low + (action + 1) / 2 * (self.high - self.low)).astype(
                self.env.action_space.dtype)
        reward, terminated, truncated = 0.0, False, False
        for _ in range(self.action_repeat):     # (make's max_episode_steps sets truncated)
            obs, r, terminated, truncated, _ = self.env.step(action)
            reward += float(r)
            self.steps += 1
            if terminated or truncated:
                break
        return self.observe(obs), reward, bool(terminated or truncated), bool(terminated)


# ============================================================================================
# Speed: the same maths, computed faster
# ============================================================================================

# Dense layers through oneDNN on the CPU. Where the default fp32 matrix product (MKL) is slow,
# e.g. on AMD CPUs (≈200 GFLOP/s on 2 cores here), oneDNN's reaches ≈440. `linear(x, W, b)`
# computes exactly F.linear(x, W, b) in fp32 (only rounding differs) and is F.linear itself on
# GPUs, for other dtypes, and in torch builds without a working oneDNN op.
def _find_onednn_linear():
    """The op torch.compile uses for dense layers on CPUs, if this torch build has one that
    works here (checked once on a tiny product; any failure means: use F.linear)."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x, w, b = torch.randn(3, 5), torch.randn(4, 5), torch.randn(4)
        ok = torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5)
        return op if ok else None
    except Exception:
        return None

_onednn_linear = _find_onednn_linear()


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):                  # x [N, I], weight [O, I], bias [O]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias, "none", [], "")            # x·Wᵀ + b: [N, O]

    @staticmethod
    def backward(ctx, grad):                            # grad [N, O]
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:                     # ∂/∂x = grad·W: [N, I], via oneDNN
            gx = _onednn_linear(grad, weight.t().contiguous(), None, "none", [], "")
        if ctx.needs_input_grad[1]:                     # ∂/∂W = gradᵀ·x: [O, I] (MKL: no copies)
            gw = grad.t() @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:    # ∂/∂b = Σ_n grad: [O]
            gb = grad.sum(0)
        return gx, gw, gb


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias) for x [..., I], weight [O, I] → [..., O]; see above."""
    if _onednn_linear is None or x.device.type != "cpu" or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    y = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(), bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters, same maths) whose products go through `linear` above."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


def bf16_is_native(device):
    """Whether this device computes bfloat16 natively. CPUs without AVX512-BF16/AMX (e.g. an
    AVX2-only AMD EPYC) emulate it: there --precision bf16 made an update 4.2x slower than
    fp32 (measured), so main() warns. GPUs: compute capability 8.0 (Ampere) or newer."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def conv_precision(precision, device):
    """Speed, opt-in (--precision bf16): run the convolutions, 63% of an update's arithmetic, in
    bfloat16 through autocast; their outputs return to float32 before anything else sees them."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

def channels_last(x):
    """x (a tensor, or a module's weights) in channels-last (NHWC) memory: the same values and
    shapes; oneDNN's convolutions on CPU run ≈1.9× faster on it (and cuDNN's like it)."""
    if isinstance(x, nn.Module):
        return x.to(memory_format=torch.channels_last)
    return x.contiguous(memory_format=torch.channels_last)


def deconv_on_1x1(deconv, x):
    """deconv(x) for a transposed convolution (no padding) on a 1×1 image x [N, C, 1, 1]: each
    output pixel is one tap of the kernel, so it is a plain matrix product, [N, C] @ W[C, C′·k·k]
    + b → [N, C′, k, k], ≈2× faster than the convolution call."""
    w = deconv.weight                                               # [C, C′, k, k]
    y = linear(x.flatten(1), w.flatten(1).t()).view(-1, *w.shape[1:])
    return y + deconv.bias[:, None, None]


# ============================================================================================
# Diagnostics: is the actor stuck? What does the world model see, and how far ahead?
# ============================================================================================

@torch.no_grad()
def actor_diagnostics(actor, z, h):
    """Is the actor stuck? (Trainer.watch_actor) The policy at an update's start states, z [B, L,
    Z] and h [B, L, D], before its step: actor/mean_abs, the mean |μ| (tanh_normal: pre-tanh),
    and actor/saturation, the fraction of its mode's entries with |a| > 0.95, as 0-d tensors;
    {} for the one-hot actor, which has no bounds to run into."""
    if actor.discrete:
        return {}
    mean, _ = actor.dist_params(torch.cat([z, h], -1))              # [B, L, A]
    return {"actor/mean_abs": mean.abs().mean(),
            "actor/saturation": action_saturation(actor.mode(mean))}




# A stuck actor (README: "When the actor collapses"): the policy's mode at the bounds for most
# states and a vanishing gradient of Eq. 7, for STUCK_PHASES training phases in a row.
SATURATED, STUCK_SATURATION, STUCK_GRAD_NORM, STUCK_PHASES = 0.95, 0.5, 0.05, 3


def action_saturation(actions):
    """Fraction of action entries with |a| > 0.95: a numpy array or a tensor of any shape → a
    float or a 0-d tensor. Of executed actions (train/action_saturation, exploration noise
    included) a uniform random policy has 0.05, and an actor pinned at a bound, with the
    paper's noise N(0, 0.3), about 0.57; of the policy's mode (actor/saturation) 0 … 1."""
    if isinstance(actions, torch.Tensor):
        return (actions.abs() > SATURATED).float().mean()
    return float(np.mean(np.abs(actions) > SATURATED))


def actor_stuck(history):
    """history: [(actor/saturation, actor/grad_norm) of each training phase, …] → True when the
    last STUCK_PHASES phases all have the mode of ≥ 50 % of the start states' actions at
    |a| > 0.95 and a gradient norm ≤ 0.05: the actor's mean has run into tanh's flat tails
    (∂a/∂u = 1 − tanh²u ≈ 0), so Eq. 7 barely moves it, and the agent keeps pushing to one side.
    (The seed-0 and seed-1 cpu runs on reacher_easy would have been flagged at 14k and 10k.)"""
    last = history[-STUCK_PHASES:]
    return len(last) == STUCK_PHASES and all(
        sat >= STUCK_SATURATION and grad <= STUCK_GRAD_NORM for sat, grad in last)


@torch.no_grad()
def filter_and_predict(wm, obs, action, context):
    """The two ways the world model can know a state: filtered (the posterior of Eq. 1,
    representation, which has seen every image up to o_t) and predicted open loop (the prior of
    Eq. 1, transition, rolled forward on the recorded actions alone after the first `context`
    images, as imagination does). obs uint8 [N, L, 3, 64, 64], action [N, L, A] (row t holds
    a_{t−1}), 0 < context < L → (filtered, open_loop) model states s_t = cat(z_t, h_t), each
    [N, L, F]; rows < context of both are the same posterior states. Random: z_t is sampled."""
    L = obs.shape[1]
    if not 0 < context < L:
        raise UserError(f"an open-loop chunk needs more than {context} rows, got {L}")
    s = wm.rssm.observe(wm.encoder(preprocess(obs, wm.state_transform)), action)   # [N, L, ·]
    filtered = torch.cat([s["z"], s["h"]], -1)                          # [N, L, F]
    z, h = s["z"][:, context - 1], s["h"][:, context - 1]               # s_{C−1}: [N, Z], [N, D]
    predicted = [filtered[:, :context]]
    for t in range(context, L):
        z, h = wm.rssm.imagine_step(z, h, action[:, t])                 # s_t ~ prior
        predicted.append(torch.cat([z, h], -1)[:, None])                # [N, 1, F]
    return filtered, torch.cat(predicted, 1)                            # [N, L, F] each


def require_decoder(wm):
    """Raise UserError unless the world model has a decoder to draw its predictions with."""
    if wm.decoder is None:
        raise UserError(f"this world model has no decoder to draw: it was trained with "
                        f"--representation {wm.representation}, which learns no images")


def decode_image(wm, feat):
    """The decoder's mean image (Eq. 1, observation model) as uint8: feat [..., F] →
    [..., 3, 64, 64]. Raises UserError for a world model without a decoder."""
    require_decoder(wm)
    return ((wm.decoder(feat) + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def decode_observation(wm, feat):
    """The decoder's mean observation: an image as decode_image gives it, or (--obs state) the
    state vector in the environment's own units, float [..., O] (symexp undoes symlog)."""
    if len(wm.obs_shape) == 3:
        return decode_image(wm, feat)
    require_decoder(wm)
    mean = wm.decoder(feat)
    return symexp(mean) if wm.state_transform == "symlog" else mean


@torch.no_grad()
def open_loop(wm, episode, start=0, length=50, context=5):
    """As the official code's "openl" video summaries [official code]: one replay chunk, seen for its first
    `context` images and predicted from the actions alone after them (filter_and_predict), every
    state decoded. Good reconstructions with poor open-loop frames or rewards mean the model
    cannot yet predict, and behaviour learned in it is learned in a dream that reality does not
    keep. episode: replay dict (obs uint8 [T+1, 3, 64, 64], action [T+1, A], reward [T+1]).
    → dict of numpy arrays over the chunk's L = `length` rows: obs and model (uint8
    [L, 3, 64, 64]), reward and reward_pred [L] (both tanh(r) where the model learned tanh(r));
    rows < context are reconstructions. With state vectors (--obs state) obs and model are
    float [L, O], and filtered [L, O] holds the posterior's decoded states beside them."""
    device = next(wm.parameters()).device
    chunk = {k: torch.as_tensor(np.asarray(v)[start:start + length], device=device)
             for k, v in episode.items()}
    filtered, feat = filter_and_predict(wm, chunk["obs"][None], chunk["action"][None], context)
    feat = feat[0]                                                      # [L, F]
    state = {} if len(wm.obs_shape) == 3 else {
        "filtered": decode_observation(wm, filtered[0]).cpu().numpy()}
    return {"obs": chunk["obs"].cpu().numpy(), **state,
            "model": decode_observation(wm, feat).cpu().numpy(),
            "reward": model_reward(wm, chunk["reward"]).cpu().numpy(),
            "reward_pred": wm.reward(feat).cpu().numpy(), "context": context}


@torch.no_grad()
def prediction_error(wm, episodes, horizon=45, context=5, stride=10):
    """How far ahead the world model can see: the error of open-loop predictions k = 1 … horizon
    steps after the last seen image, beside the error of the filtered states (posterior, image
    seen) at the same steps. Chunks of context + horizon rows start every `stride` rows of each
    episode (replay dicts as in open_loop). Image error: per-pixel MSE of the decoder's mean
    with pixels in [0, 1]; reward error: mean |r̂_t − r_t| (of tanh(r) if the model learned
    it). → dict of numpy [horizon] arrays image_open, image_filtered, reward_open,
    reward_filtered, and chunks (how many). Random: z_t is sampled; seed torch to repeat it.
    Raises UserError without a decoder."""
    require_decoder(wm)
    device = next(wm.parameters()).device
    L = context + horizon
    chunks = [{k: np.asarray(v)[t:t + L] for k, v in ep.items()}
              for ep in episodes for t in range(0, len(ep["reward"]) - L + 1, stride)]
    if not chunks:
        raise UserError(f"no episode has the {L} rows that context {context} + horizon "
                        f"{horizon} need")
    out = {k: [] for k in ("image_open", "image_filtered", "reward_open", "reward_filtered")}
    for i in range(0, len(chunks), 64):                                 # 64 chunks at a time
        batch = {k: torch.as_tensor(np.stack([c[k] for c in chunks[i:i + 64]]), device=device)
                 for k in ("obs", "action", "reward")}                   # [N, L, ...]
        filtered, predicted = filter_and_predict(wm, batch["obs"], batch["action"], context)
        real = preprocess(batch["obs"][:, context:], wm.state_transform)   # [N, H, 3, 64, 64]
        # (state vectors: [N, H, O], and the "image" errors are per entry)
        real_reward = model_reward(wm, batch["reward"][:, context:])    # [N, H]
        for name, feat in (("open", predicted[:, context:]), ("filtered", filtered[:, context:])):
            image = wm.decoder(feat)                                    # mean, in [−½, ½]
            out[f"image_{name}"].append(((image - real) ** 2).flatten(2).mean(-1))    # [N, H]
            out[f"reward_{name}"].append((wm.reward(feat) - real_reward).abs())
    result = {k: torch.cat(v).mean(0).cpu().numpy() for k, v in out.items()}  # [H] each
    return {**result, "chunks": len(chunks)}


# ============================================================================================
# Trained agents: load, export, play, evaluate (python dreamer.py --evaluate LOGDIR)
# ============================================================================================

def load_agent(logdir, device="cpu"):
    """A run's last checkpoint as an agent: config.json + checkpoint.pt → (task, Config, Dreamer,
    checkpoint dict). A weights-only checkpoint (world_model, actor, value, counters, last) is
    enough; weights stored in 16-bit floats are widened. Raises UserError when either file is
    missing or does not fit."""
    try:
        task, cfg, state = read_run(logdir, device)
        action_dim = state["world_model"]["rssm.img_in.weight"].shape[1] - cfg.stoch_size
        obs_shape = ((3, 64, 64) if cfg.obs == "pixels" else   # state: the encoder's input size
                     (state["world_model"]["encoder.net.0.0.weight"].shape[1],))
        agent = Dreamer(cfg, action_dim, device, obs_shape)
        for name, module in agent.modules().items():
            module.load_state_dict(state[name])
        state["counters"]["updates"], state["last"]["eval/return"]   # read by evaluate_run
    except Exception as e:
        raise UserError(f"cannot load the run in {logdir} ({one_line(e)})") from None
    return task, cfg, agent, state


def export_agent(logdir, out):
    """Keep a trained agent small enough to share: the world model, actor and value model of a
    run's last checkpoint (and its return scale S, if it used --return_norm), their weights
    stored as 16-bit floats (half the bytes; load_agent widens them back), with the run's
    config.json and metrics.jsonl, written into the folder `out` (created; refused if it holds
    a checkpoint).
    Optimiser and RNG states, and the replay, stay behind: the copy can be evaluated and
    pictured (plot.py), not resumed; its returns differ a little from the run's, as rounding
    changes some actions and so the episode. Raises UserError."""
    logdir, out = Path(logdir), Path(out)
    try:
        _, _, state = read_run(logdir)
        weights = {name: {k: v.half() if v.is_floating_point() else v
                          for k, v in state[name].items()}
                   for name in ("world_model", "actor", "value", "return_scale")
                   if name in state}
        weights.update(counters=state["counters"], last=state["last"])
        files = {name: (logdir / name).read_bytes() for name in ("config.json", "metrics.jsonl")}
    except Exception as e:
        raise UserError(f"cannot load the run in {logdir} ({one_line(e)})") from None
    if (out / "checkpoint.pt").exists():
        raise UserError(f"{out} already holds a checkpoint; choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            save_atomically(out / name, lambda f, data=data: f.write(data))
        save_atomically(out / "checkpoint.pt", lambda f: torch.save(weights, f))
    except OSError as e:
        raise UserError(f"cannot write the agent to {out} ({one_line(e)})") from None


def play(task, cfg, agent, episodes, frames=False):
    """Episodes of an agent's policy (its mode, no exploration noise) on new initial states, as
    a run's evaluations play them (cfg: the run's Config, agent: from load_agent) → a generator
    of (episode dict as in run_episode, return). Initial states come from seed + 20,000, a
    stream that neither the run's training (seed) nor its evaluations (seed + 10,000) used;
    torch is seeded alike, because act() samples z_t. frames=True adds each episode's rendered
    frames, "frames" uint8 [T+1, 3, 64, 64] (for pictures of a state run)."""
    env = make_env(task, cfg.action_repeat, cfg.time_limit, seed=cfg.seed + REEVAL_SEED_OFFSET,
                   shadow_size=cfg.shadow_size, training=False, obs=cfg.obs)
    if frames:
        env = _Recording(env)
    seed_everything(cfg.seed + REEVAL_SEED_OFFSET)
    for _ in range(episodes):
        episode, ret = run_episode(env, lambda obs, s: agent.act(obs, s, explore=False))
        if frames:
            episode["frames"] = np.stack(env.frames)                    # [T+1, 3, 64, 64]
        yield episode, float(ret)


class _Recording:
    """An environment that also keeps the frame a person would see after each reset and step
    (render()), for pictures of an agent that sees state vectors."""

    def __init__(self, env):
        self.env, self.frames = env, []

    def __getattr__(self, name):
        return getattr(self.env, name)

    def reset(self):
        obs = self.env.reset()
        self.frames = [self.env.render()]
        return obs

    def step(self, action):
        out = self.env.step(action)
        self.frames.append(self.env.render())
        return out


def read_run(logdir, device="cpu"):
    """A run folder's config.json and checkpoint.pt → (task, Config, checkpoint dict)."""
    record = json.loads((Path(logdir) / "config.json").read_text())
    names = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in record.items() if k in names})
    state = torch.load(Path(logdir) / "checkpoint.pt", map_location=device, weights_only=False)
    return record.get("task"), cfg, state


def evaluate_run(logdir, episodes=None, device="cpu"):
    """python dreamer.py --evaluate RUN: the policy of a run's last checkpoint, evaluated as
    during training (its mode, no exploration noise) on `episodes` new episodes (default: the
    run's eval_episodes), played by play(). A run's own evaluations use few episodes, and on
    tasks where an episode mostly succeeds or mostly fails (reacher: the fingertip sits in the
    target or never reaches it) their mean swings by hundreds; this measures one checkpoint as
    precisely as asked. Writes nothing. → the list of returns."""
    task, cfg, agent, state = load_agent(logdir, device)
    updates, last = state["counters"]["updates"], state["last"]["eval/return"]
    episodes = episodes or cfg.eval_episodes
    print(f"evaluating {logdir}: {task}, checkpoint after {updates} updates (its last evaluation "
          f"in training: {last:.1f}); {episodes} episodes, policy mode", flush=True)
    returns = []
    for i, (_, ret) in enumerate(play(task, cfg, agent, episodes)):
        returns.append(ret)
        print(f"  episode {i + 1}/{episodes}: return {ret:.1f}", flush=True)
    mean, std = float(np.mean(returns)), float(np.std(returns))    # std: np.std, ddof = 0
    sem = std / math.sqrt(episodes)                                  # standard error of the mean
    print(f"eval return {mean:.1f} over {episodes} episodes (standard error {sem:.1f}; "
          f"std across episodes {std:.1f})")
    print(json.dumps({"returns": returns, "mean": mean, "std": std, "sem": sem,
                      "updates": updates}), flush=True)
    return returns


# ============================================================================================
# Tasks by name (--env) and the renderer
# ============================================================================================

TASK_ALIASES = {"cup_catch": ("ball_in_cup", "catch")}   # the paper's name for ball_in_cup_catch


# DMC domains whose tasks this agent cannot run, with the reason: refused by name, up front.
UNSUPPORTED_DOMAINS = {
    "lqr": "its action bounds are ±1e10, onto which the actor's tanh-squashed actions in "
           "[−1, 1] cannot sensibly be scaled, and its episodes end early (once the state is "
           "near 0), which this DMC agent does not model",
}


def all_tasks():
    """Every valid --env name: 'domain_task' for each DMC suite task this agent can run, plus
    the paper's aliases."""
    from dm_control import suite
    return sorted({f"{d}_{t}" for d, t in suite.ALL_TASKS if d not in UNSUPPORTED_DOMAINS}
                  | set(TASK_ALIASES))


def parse_task(name):
    """'reacher_easy' → ('reacher', 'easy'); 'ball_in_cup_catch' → ('ball_in_cup', 'catch');
    'atari_pong' → ('atari', 'pong'); 'gym:Pendulum-v1' → ('gym', 'Pendulum-v1'). Raises
    UserError for a malformed or unknown name."""
    if is_atari(name):
        return "atari", atari_game(name[len("atari_"):])
    if is_gym(name):
        probe_gym(name)                      # refuses an unknown or unusable environment
        return "gym", name[len("gym:"):]
    if not re.fullmatch(r"[A-Za-z0-9]+(_[A-Za-z0-9]+)+", name or ""):
        raise UserError(f"malformed task name {name!r}: expected domain_task, "
                        f"e.g. reacher_easy or cheetah_run")
    if name in TASK_ALIASES:
        return TASK_ALIASES[name]
    from dm_control import suite
    for domain, task in suite.ALL_TASKS:
        if f"{domain}_{task}" == name:
            if domain in UNSUPPORTED_DOMAINS:
                raise UserError(f"{name} cannot be run by this agent: "
                                f"{UNSUPPORTED_DOMAINS[domain]}")
            return domain, task
    raise UserError(f"unknown task {name!r}; valid tasks: {', '.join(all_tasks())}, or "
                    f"atari_GAME for an Atari game (e.g. atari_pong), or gym:ID for a "
                    f"Gymnasium environment (e.g. gym:Pendulum-v1)")


def is_atari(task):
    return (task or "").startswith("atari_")


def is_gym(task):
    return (task or "").startswith("gym:")


def is_discrete(task):
    """Whether the task's actions are discrete (one-hot): Atari, or a Gymnasium Discrete space."""
    return is_atari(task) or (is_gym(task) and probe_gym(task)["discrete"])


def atari_game(game):
    """An ALE game name (snake_case, as ale-py names its ROMs: pong, space_invaders) → itself.
    Raises UserError when ale-py is missing or does not know the game."""
    try:
        from ale_py import roms
    except ImportError:
        raise UserError("Atari needs the package ale-py (pip install -r requirements.txt)") \
            from None
    games = sorted(roms.get_all_rom_ids())
    if game not in games:
        raise UserError(f"unknown Atari game {game!r}; valid: "
                        f"{', '.join('atari_' + g for g in games)}")
    return game


def headless_gl(environ, platform):
    """MuJoCo's renderer must be chosen before dm_control is first imported (lazily, in
    make_env). → "egl" on Linux (EGL renders without a display, on a GPU or with Mesa in
    software, and the same pixels with one), else None: a user's own MUJOCO_GL wins, and on
    macOS and Windows dm_control's own choice (GLFW) stands. Where neither works,
    MUJOCO_GL=osmesa renders in software."""
    return "egl" if platform.startswith("linux") and "MUJOCO_GL" not in environ else None

if headless_gl(os.environ, sys.platform):
    os.environ["MUJOCO_GL"] = "egl"


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


# ============================================================================================
# The machinery of a run: errors, seeds, signals, the logdir, checkpoints, memory, the Trainer
# ============================================================================================

class UserError(Exception):
    """Bad input from the command line or the logdir: main() prints it as one line, exit 2."""


class RunError(Exception):
    """A fault during a run (the simulator failed, training diverged, a write failed, memory ran
    out): main() prints it as one line, exit 1. The message says what was kept on disk."""


class SimulatorError(RunError):
    """MuJoCo failed (dm_control's PhysicsError, or mujoco's FatalError). The models are still
    sound, so a run saves its checkpoint before stopping."""


class Diverged(RunError):
    """A loss, gradient norm or parameter became NaN or ±inf, or the policy sent a non-finite
    action: the models are no longer sound, so nothing is saved after the last checkpoint."""


def one_line(error):
    """An exception as 'Type: first line of its message', for one-line error reports."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def save_atomically(path, write):
    """Write to a temporary file PATH.tmp beside `path`, then rename: a crash, a kill or a full
    disk mid-write leaves the previous file intact, never a half-written one. A failed write
    removes its temporary file; one left by a kill is removed when the run resumes."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states():
    states = {"python": random.getstate(), "numpy": np.random.get_state(),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    # torch.load(map_location=cuda) moves these ByteTensors to the GPU; the setters want them
    # on the CPU.
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


def fmt_time(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class StopFlag:
    """Ctrl-C (SIGINT), or SIGTERM as a job scheduler sends it, sets a flag that the loop checks
    between env steps and between updates, so the interrupt never lands inside MuJoCo's or
    torch's internals; a second one stops at once. check() raises KeyboardInterrupt once a stop
    was asked for."""

    def __init__(self):
        self.requested = self.forced = False
        self.signum = signal.SIGINT

    def handler(self, signum, frame):
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    def check(self):
        if self.requested:
            raise KeyboardInterrupt


def lock_logdir(logdir):
    """An exclusive lock on LOGDIR/lock, held while the returned file stays open (the OS drops it
    when the process ends, however it ends): two runs started on one logdir would number their
    episodes alike and overwrite each other. Raises UserError if another process holds it."""
    lock = open(logdir / "lock", "w")
    try:
        import fcntl                                     # POSIX (Linux, macOS)
    except ImportError:                                  # Windows: the file, but no lock
        return lock
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UserError(f"{logdir} is in use by another run (it holds {logdir / 'lock'}); wait "
                        f"for it to stop, or use another --logdir") from None
    return lock

EVAL_PROGRESS = 20_000     # env steps between an evaluation's progress lines (Atari: 80 s or so)


def first_nonfinite(tensors):
    """The name of the first tensor of {name: tensor} holding a NaN or ±inf, else None (one
    device sync for all of them)."""
    finite = torch.stack([torch.isfinite(v).all() for v in tensors.values()])
    if bool(finite.all()):
        return None
    return list(tensors)[int((~finite).nonzero()[0, 0])]


def divergence_hint(cfg, name):
    """A likely cause of a non-finite loss, gradient norm or parameter `name`, for the error
    line: a learning rate far above the paper's (that part's first), else the usual suspects."""
    part = re.split(r"[/.]", name)[0]
    flags = {"model": "model_lr", "world_model": "model_lr", "actor": "actor_lr",
             "behaviour": "actor_lr", "value": "value_lr"}
    order = [flags.get(part, "model_lr")] + ["model_lr", "actor_lr", "value_lr"]
    for flag in dict.fromkeys(order):
        mine, paper = getattr(cfg, flag), getattr(Config(), flag)
        if mine > 10 * paper:
            return f"likely cause: --{flag} {mine:g} is {mine / paper:,.0f}× the paper's {paper:g}"
    return ("likely causes: a learning rate or --grad_clip too large, --adam_eps too small, or "
            "--precision bf16")


def out_of_memory(error):
    """Whether an exception is an allocation failure (CPU or GPU)."""
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and any(
            text in str(error) for text in ("can't allocate memory", "out of memory",
                                            "CUBLAS_STATUS_ALLOC_FAILED")))


def replay_bytes_per_env_step(cfg, obs_shape, action_dim):
    """Bytes the replay holds per env step: one row per agent step (observation: uint8 pixels
    or float32 state; float32 action and reward; bool terminal), ÷ action repeat."""
    obs = int(np.prod(obs_shape)) * (1 if cfg.obs == "pixels" else 4)
    return (obs + 4 * action_dim + 4 + 1) / cfg.action_repeat


def available_memory():
    """Bytes of memory this machine can give a new allocation (Linux: MemAvailable), or its
    physical memory where that is unknown, or None."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def replay_memory_note(cfg, obs_shape, action_dim, available):
    """The start-of-run line on what the replay will hold by --steps (GB, against `available`
    bytes), and whether it fits: → (line, fits). A run that will not fit is told which
    --replay_capacity does."""
    per_step = replay_bytes_per_env_step(cfg, obs_shape, action_dim)
    held = min(cfg.steps, cfg.replay_capacity or cfg.steps)
    bound = (f"--replay_capacity {cfg.replay_capacity:,} env steps" if cfg.replay_capacity
             else "no bound: --replay_capacity 0")
    line = (f"replay: {held * per_step / 1e9:.2f} GB in memory by --steps {cfg.steps:,} "
            f"({per_step * 1e6 / 1e9:.2f} GB per 10⁶ env steps; {bound})")
    if available is None:
        return line, True
    line += f"; this machine has {available / 1e9:.1f} GB available"
    if held * per_step <= available:
        return line, True
    fit = int(0.5 * available / per_step)
    fit = max(cfg.time_limit, fit - fit % 100_000 if fit > 100_000 else fit)
    return (f"{line}. It will not fit: the replay alone would fill it near "
            f"{int(available / per_step):,} env steps and the run die of memory; pass "
            f"--replay_capacity {fit:,} (≈ {fit * per_step / 1e9:.1f} GB) to keep only the newest "
            f"episodes in memory"), False


class Trainer(TrainingLoop):
    """A run: its state (agent, replay, environments, counters, logdir) and everything around
    Algorithm 1 (TrainingLoop): checkpoints, so that the same command resumes where a run
    stopped, logging, evaluation, signals and faults."""

    def __init__(self, cfg, task, logdir, device):
        self.cfg, self.task, self.logdir = cfg, task, Path(logdir)
        self.checkpoint_path = self.logdir / "checkpoint.pt"
        self.config_record = {"task": task, **dataclasses.asdict(cfg)}   # what config.json holds
        check_task_config(cfg, task)
        self.check_logdir()
        seed_everything(cfg.seed)
        self.env = make_env(task, cfg.action_repeat, cfg.time_limit, seed=cfg.seed,
                            shadow_size=cfg.shadow_size, obs=cfg.obs, min_length=cfg.batch_length)
        check_task_fits(cfg, task, self.env.max_env_steps, self.env.can_end_early)
        # A separate environment for evaluation, so evaluating leaves training's RNG alone.
        self.eval_env = make_env(task, cfg.action_repeat, cfg.time_limit,
                                 seed=cfg.seed + EVAL_SEED_OFFSET, shadow_size=cfg.shadow_size,
                                 training=False, obs=cfg.obs)
        self.agent = Dreamer(cfg, self.env.action_dim, device, self.env.obs_shape)
        # Tasks that end early sample their episodes' ends more often (EndsReplayBuffer; not in
        # the paper: DreamerV2's pre-release code).
        replay = EndsReplayBuffer if self.env.can_end_early else ReplayBuffer
        self.replay = replay(self.logdir / "episodes", seed=cfg.seed,
                             capacity=cfg.replay_capacity // cfg.action_repeat,
                             action_repeat=cfg.action_repeat)
        self.counters = {"next_train": 0, "next_eval": cfg.eval_every, "updates": 0,
                         "phase_updates": 0, "next_checkpoint": cfg.checkpoint_every}
        self.last = {"train/return": float("nan"), "eval/return": float("nan")}
        self.stop = StopFlag()
        self.saved = {"env_steps": None, "metrics_bytes": None}   # what the checkpoint holds
        self.resumed = self.checkpoint_path.exists()
        self.actor_history, self.warned_stuck = [], False     # watch_actor
        self.train_metrics = {}                                # the last phase's, for progress
        self.phase_seconds = 0.0                               # time in training phases
        if self.resumed:
            self.load_checkpoint()
        try:
            self.replay.load()
        except Exception as e:
            if not out_of_memory(e):
                raise
            raise RunError(f"out of memory while loading the replay from {self.logdir} "
                           f"({one_line(e)}); every file is intact: free memory and run the "
                           f"same command, or resume with a smaller --replay_capacity (now "
                           f"{cfg.replay_capacity or 'no bound'})") from None
        if self.replay.num_episodes >= cfg.seed_episodes:
            # Seeding is over, but the checkpoint may be from before its end, or absent (the run
            # was killed before its first one; fresh models then learn from the data): the first
            # training phase is where it would have been, right after the seed episodes.
            self.counters["next_train"] = max(self.counters["next_train"],
                                              sum(self.replay.env_steps[:cfg.seed_episodes]))
        # Only now, with everything read back, is anything written to the logdir.
        try:
            self.logdir.mkdir(parents=True, exist_ok=True)
            self.lock = lock_logdir(self.logdir)
            config = json.dumps(self.config_record, indent=1).encode()
            save_atomically(self.logdir / "config.json", lambda f: f.write(config))
            for tmp in [*self.logdir.glob("*.tmp"), *self.logdir.glob("episodes/*.tmp")]:
                tmp.unlink()          # left by a kill inside save_atomically: never read
            self.reconcile_metrics()
        except OSError as e:
            raise UserError(f"cannot write to the logdir {self.logdir} ({one_line(e)})") from None

    # -- logdir, config and checkpoints -----------------------------------------------------
    def check_logdir(self):
        """A logdir belongs to one experiment: refuse to resume one with another config."""
        config_path = self.logdir / "config.json"
        mine = self.config_record
        if config_path.exists():
            try:
                theirs = json.loads(config_path.read_text())
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read {config_path} ({e})") from None
            # A field added to Config after the run started counts as having had its default.
            theirs = {**{f.name: f.default for f in dataclasses.fields(Config)}, **theirs}
            diff = [k for k in mine if k not in RESUMABLE_FIELDS and theirs.get(k) != mine[k]]
            if diff:
                k = diff[0]
                raise UserError(f"{self.logdir} holds a run with {k}={theirs.get(k)!r}, not "
                                f"{mine[k]!r}; pass the same flags to resume, or another --logdir")
        elif self.checkpoint_path.exists() or (self.logdir / "episodes").exists():
            raise UserError(f"{self.logdir} holds a run but no config.json; use another --logdir")

    def check_parameters(self):
        """Raise Diverged if any parameter is NaN or ±inf (after an Adam step of finite
        gradients that overflowed, say): such models are never saved or acted with."""
        params = {f"{name}.{k}": v for name, m in self.agent.modules().items()
                  for k, v in m.named_parameters()}
        bad = first_nonfinite(params)
        if bad is not None:
            raise Diverged(f"training diverged by update {self.counters['updates']}: parameter "
                           f"{bad} is not finite; {divergence_hint(self.cfg, bad)}")

    def save_checkpoint(self):
        self.check_parameters()
        metrics = self.logdir / "metrics.jsonl"
        saved = {"env_steps": self.env_steps(),              # to tell what a resume redoes
                 "metrics_bytes": metrics.stat().st_size if metrics.exists() else 0}
        state = {name: m.state_dict() for name, m in self.agent.modules().items()}
        state.update({name: o.state_dict() for name, o in self.agent.optimisers().items()})
        state.update(counters=self.counters, rng=rng_states(), last=self.last,
                     replay_rng=self.replay.rng.bit_generator.state,
                     env_rng=self.env.random_state.get_state(),
                     eval_env_rng=self.eval_env.random_state.get_state(), **saved)
        save_atomically(self.checkpoint_path, lambda f: torch.save(state, f))
        self.saved = saved

    def load_checkpoint(self):
        try:
            # weights_only=False: the file also holds RNG states; only load your own checkpoints.
            state = torch.load(self.checkpoint_path, map_location=self.agent.device,
                               weights_only=False)
            for name, m in self.agent.modules().items():
                m.load_state_dict(state[name])
            for name, o in self.agent.optimisers().items():
                o.load_state_dict(state[name])
            self.counters.update(state["counters"])     # counters added later keep defaults
            self.last = state["last"]
            set_rng_states(state["rng"])
            self.replay.rng.bit_generator.state = state["replay_rng"]
            self.env.random_state.set_state(state["env_rng"])
            self.eval_env.random_state.set_state(state["eval_env_rng"])
            self.saved = {k: state.get(k) for k in self.saved}   # absent in older checkpoints
        except Exception as e:
            raise UserError(f"cannot read checkpoint {self.checkpoint_path} ({one_line(e)}); "
                            f"move it away to start over, or use another --logdir") from None

    def log(self, step, metrics):
        """Append one JSON line (strict JSON: a NaN or ±inf value is written as null)."""
        values = {k: float(v) for k, v in metrics.items()}
        record = {"step": step, **{k: v if math.isfinite(v) else None for k, v in values.items()}}
        with open(self.logdir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")

    def reconcile_metrics(self):
        """After a kill, make metrics.jsonl agree with what resuming keeps: the lines the
        checkpoint saw, then one record per episode collected since (rebuilt from its episode
        file). Training phases and evaluations logged after the checkpoint are dropped, since
        the resumed run redoes them, and so is a line cut in half. A clean stop changes nothing."""
        path = self.logdir / "metrics.jsonl"
        data = path.read_bytes() if path.exists() else b""
        keep = self.saved["metrics_bytes"]
        if keep is None:   # no checkpoint: keep nothing; one from before this field: all
            keep = len(data) if self.resumed else 0
        head = data[:keep]
        head = head[:head.rfind(b"\n") + 1]                        # whole lines only
        logged = head.count(b'"train/return"')                     # episodes already logged
        new, steps = [], 0
        for i, length in enumerate(self.replay.env_steps):                 # env steps
            steps += length
            if i >= logged:
                episode = self.replay.episode(i)
                ret = float(np.sum(episode["reward"], dtype=np.float64))
                new.append(json.dumps({"step": steps, "train/return": ret, "train/length": length,
                                       "train/action_saturation":
                                           action_saturation(episode["action"][1:])}))
        fixed = head + "".join(line + "\n" for line in new).encode()
        if fixed != data:
            save_atomically(path, lambda f: f.write(fixed))

    # -- evaluation, bookkeeping and the run around Algorithm 1 ------------------------------
    def evaluate(self):
        """Mean return of eval_episodes episodes with the policy's mode, no exploration noise
        (discrete actions: ε-greedy with ε = epsilon_eval). An Atari episode can be 108,000
        frames long: progress lines say how far an evaluation got."""
        n = self.cfg.eval_episodes
        returns = [self.collect(self.eval_env, explore=False, label=f"evaluation {i + 1}/{n}")[1]
                   for i in range(n)]
        return float(np.mean(returns))

    def evaluate_and_log(self, steps):
        self.last["eval/return"] = self.evaluate()
        self.log(steps, {"eval/return": self.last["eval/return"]})
        while self.counters["next_eval"] <= steps:
            self.counters["next_eval"] += self.cfg.eval_every

    def env_steps(self):
        """Env steps played so far: the frames actually played, counted per episode."""
        return self.replay.num_env_steps

    def check_update(self, metrics):
        """Raise Diverged if one update's losses or gradient norms hold a NaN or ±inf."""
        bad = first_nonfinite(metrics)
        if bad is not None:
            raise Diverged(f"training diverged at update {self.counters['updates']}: {bad} is "
                           f"{metrics[bad].item()}; {divergence_hint(self.cfg, bad)}")

    def phase_summary(self, metrics, start):
        """A training phase's metrics: each update's, averaged, with its pace and (tasks that
        end early) how much of the replay fits a chunk."""
        mean = {k: torch.stack([m[k] for m in metrics]).mean().item() for k in metrics[0]}
        seconds = time.perf_counter() - start
        self.phase_seconds += seconds
        mean["time/updates_per_s"] = len(metrics) / seconds
        if self.env.can_end_early:       # how much of the replay fits a chunk (Atari, gym:)
            mean["replay/sampleable"] = self.replay.sampleable(self.cfg.batch_length)
        return mean

    def after_episode(self, steps, episode, ret, t_env):
        """After each collected episode: its metrics line, the evaluation and the checkpoint when
        due, the progress line. steps: the env steps before the episode. → the env steps now."""
        cfg, c = self.cfg, self.counters
        new_steps = self.env_steps() - steps
        steps = self.env_steps()
        self.last["train/return"] = ret
        record = {"train/return": ret, "train/length": new_steps,
                  "train/action_saturation": action_saturation(episode["action"][1:]),
                  "time/env_steps_per_s": new_steps / (time.perf_counter()
                                                       - self.phase_seconds - t_env)}
        self.log(steps, record)
        if steps >= c["next_eval"] or steps >= cfg.steps:
            self.evaluate_and_log(steps)
        if steps >= c["next_checkpoint"]:
            while c["next_checkpoint"] <= steps:
                c["next_checkpoint"] += cfg.checkpoint_every
            self.save_checkpoint()
        self.clock = (self.clock + [(time.perf_counter(), steps)])[-6:]   # the last 5 episodes
        self.progress(steps, record)
        return steps

    def run(self):
        """Train: Algorithm 1 (algorithm_1) to cfg.steps, wrapped in what a long run needs:
        resume where the checkpoint left off, Ctrl-C and SIGTERM as a clean stop with a
        checkpoint, and faults as one RunError line. → the exit status (0, or 130/143 when
        interrupted)."""
        cfg, c = self.cfg, self.counters
        steps = self.env_steps()
        finishing = steps >= cfg.steps         # every episode is in; the run's end may not be
        if finishing and self.resumed and self.saved["env_steps"] in (None, steps) \
                and c["next_eval"] > steps:    # (the final evaluation was finished)
            print(f"{self.logdir} is already at {steps} env steps ≥ --steps {cfg.steps}; "
                  f"nothing to do (pass a larger --steps to continue)", flush=True)
            return 0
        if self.resumed:
            n, held = self.replay.num_episodes, len(self.replay.episodes)
            held = f" ({held} in memory: --replay_capacity {cfg.replay_capacity})" * (held < n)
            print(f"resuming from {self.checkpoint_path}: {steps} env steps, "
                  f"{n} episodes{held}, {c['updates']} updates", flush=True)
        self.clock = [(time.perf_counter(), steps)]                  # (time, env steps) marks
        previous = {s: signal.signal(s, self.stop.handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if finishing:
                # Stopped after the last episode was written but before the final checkpoint
                # (a kill), or during the final evaluation: redo what an unbroken run did after
                # its last episode began: the phases due before its last action (every action
                # but the last played R env steps) and the final evaluation.
                last_action = self.replay.env_steps[-1] - cfg.action_repeat * (
                    self.replay.lengths[-1] - 1)
                self.train_metrics = self.train_owed(steps, due_by=steps - last_action)
                self.evaluate_and_log(steps)
            steps = self.algorithm_1(steps)
            self.save_checkpoint()
        except KeyboardInterrupt:
            for sig in previous:                  # a third Ctrl-C must not cut the save
                signal.signal(sig, signal.SIG_IGN)
            status = 128 + self.stop.signum     # 130 for Ctrl-C, 143 for SIGTERM
            if self.stop.forced:   # the second Ctrl-C may have cut an update in half: no save
                print(f"\nstopped at once; the last checkpoint in {self.logdir} is kept as it "
                      f"was", file=sys.stderr, flush=True)
                return status
            self.save_checkpoint()
            print(f"\ninterrupted at {self.env_steps()} env steps; checkpoint saved to "
                  f"{self.checkpoint_path}. Run the same command to resume "
                  f"(an unfinished episode is dropped).", file=sys.stderr, flush=True)
            return status
        except SimulatorError as e:   # the models are sound: save them, then report
            self.save_checkpoint()
            raise RunError(f"{e}; run the same command to resume; {self.kept()} (the "
                           f"unfinished episode is dropped)") from None
        except Diverged as e:
            raise RunError(f"{e}; change it and start a new --logdir; {self.kept()}") from None
        except Exception as e:
            if not out_of_memory(e):
                raise
            raise RunError(f"out of memory ({one_line(e)}); free memory and run the same "
                           f"command, or the same with a smaller --replay_capacity, or lower "
                           f"--batch_size, --batch_length or the network sizes in a new "
                           f"--logdir; {self.kept()}") from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        print(f"done: {steps} env steps, {c['updates']} updates, "
              f"last eval return {self.last['eval/return']:.1f}; logdir {self.logdir}",
              flush=True)
        return 0

    def watch_actor(self, metrics):
        """After each training phase: say once per process, and keep running, when the actor
        looks stuck (actor_stuck). The history starts afresh when a run resumes."""
        if "actor/saturation" not in metrics:                  # the one-hot actor: no tanh
            return
        self.actor_history.append((metrics["actor/saturation"], metrics["actor/grad_norm"]))
        del self.actor_history[:-STUCK_PHASES]              # all actor_stuck reads: flat memory
        if actor_stuck(self.actor_history) and not self.warned_stuck:
            self.warned_stuck = True
            sat = min(s for s, _ in self.actor_history[-STUCK_PHASES:])
            print(f"note: the actor looks stuck: for {STUCK_PHASES} training phases the policy's "
                  f"mode had |a| > {SATURATED} in ≥ {sat:.0%} of its actions and the actor's "
                  f"gradient norm was ≤ {STUCK_GRAD_NORM} (a saturated tanh passes almost no "
                  f"gradient of Eq. 7); see README, \"When the actor collapses\". Training goes "
                  f"on.", flush=True)

    def kept(self):
        """What a run that stops on a fault leaves on disk, for its error line."""
        n, at = self.replay.num_episodes, self.saved["env_steps"]
        episodes = f"{n} episode{'s' * (n != 1)}"
        if not self.checkpoint_path.exists():
            return f"kept in {self.logdir}: {episodes} (no checkpoint yet)"
        at = f" at {at} env steps" if at is not None else ""
        return f"kept in {self.logdir}: the last checkpoint{at} and {episodes}"

    def progress(self, steps, record):
        """One line per episode: where the run is, what it returns, what it learns, how fast.
        The ETA extrapolates the pace (training + collection) of the last 5 episodes."""
        (t_old, s_old), (t_new, s_new) = self.clock[0], self.clock[-1]
        train = self.train_metrics
        rate = (s_new - s_old) / max(t_new - t_old, 1e-9)
        eta = max(self.cfg.steps - steps, 0) / max(rate, 1e-9)   # (an episode may run past)
        line = (f"step {steps:>8} | ep {self.replay.num_episodes:>4} | "
                f"train {self.last['train/return']:7.1f} | eval {self.last['eval/return']:7.1f}")
        if train:
            line += (f" | model {train['model/loss']:8.1f} kl {train['model/kl']:5.2f} | "
                     f"actor {train['actor/loss']:7.2f} value {train['value/loss']:7.3f} | "
                     f"{train['time/updates_per_s']:5.2f} upd/s")
        line += f" | {record['time/env_steps_per_s']:4.0f} env/s | ETA {fmt_time(eta)}"
        print(line, flush=True)


# ============================================================================================
# Benchmark (python dreamer.py --benchmark): how fast is an update, how fast is collection?
# ============================================================================================

def peak_memory_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:   # Linux: writing 5 to clear_refs resets the process's peak resident set (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("nan")


def benchmark(cfg, task, device, updates=5, collect_steps=300):
    """Median time of full updates (world model + behaviour) after one warm-up, on replay data
    of the real shapes (random pixels: the cost does not depend on them), and the collection
    rate with the policy acting in the real environment. Prints a breakdown, then one JSON line."""
    seed_everything(cfg.seed)
    env = make_env(task, cfg.action_repeat, cfg.time_limit, seed=cfg.seed,
                   shadow_size=cfg.shadow_size, obs=cfg.obs)
    agent = Dreamer(cfg, env.action_dim, device, env.obs_shape)
    rows = min(cfg.time_limit // cfg.action_repeat, 1000) + 1
    rng = np.random.default_rng(cfg.seed)
    replay = ReplayBuffer(seed=cfg.seed)
    for _ in range(2):
        obs = (rng.integers(0, 256, (rows, 3, 64, 64), dtype=np.uint8) if cfg.obs == "pixels"
               else rng.normal(size=(rows, *env.obs_shape)).astype(np.float32))
        replay.add({"obs": obs,
                    "action": rng.uniform(-1, 1, (rows, env.action_dim)).astype(np.float32),
                    "reward": rng.normal(size=rows).astype(np.float32),
                    "terminal": np.zeros(rows, bool)})

    def sync():
        if agent.device.type == "cuda":
            torch.cuda.synchronize(agent.device)

    def one_update():
        times = {}
        t = time.perf_counter()
        batch = replay.sample(cfg.batch_size, cfg.batch_length)
        batch = {k: torch.as_tensor(v, device=agent.device) for k, v in batch.items()}
        sync(); times["sample_s"] = time.perf_counter() - t; t = time.perf_counter()
        z, h, _ = agent.update_world_model(batch)
        sync(); times["world_model_s"] = time.perf_counter() - t; t = time.perf_counter()
        feats, returns, weights, _ = agent.update_actor(z, h)
        sync(); times["actor_s"] = time.perf_counter() - t; t = time.perf_counter()
        agent.update_value(feats, returns, weights)
        sync(); times["value_s"] = time.perf_counter() - t
        times["behaviour_s"] = times["actor_s"] + times["value_s"]
        times["update_s"] = times["sample_s"] + times["world_model_s"] + times["behaviour_s"]
        return times

    # The CPU's vector instructions decide its speed (an AVX2-only CPU measured ~2.5x slower
    # per update than an AVX-512 one): name them, so that numbers from two machines are told apart.
    isa = torch.backends.cpu.get_cpu_capability() if agent.device.type == "cpu" else "-"
    print(f"benchmark: {task}, B={cfg.batch_size} L={cfg.batch_length} H={cfg.horizon}, "
          f"device {agent.device} ({isa}), {torch.get_num_threads()} threads", flush=True)
    t = time.perf_counter()
    one_update()                                             # warm-up: allocations, caches
    print(f"  warm-up update: {time.perf_counter() - t:.2f} s", flush=True)
    peak_memory_reset(agent.device)
    runs = []
    for i in range(updates):
        runs.append(one_update())
        print(f"  update {i + 1}/{updates}: {runs[-1]['update_s']:.2f} s", flush=True)
    median = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    peak = peak_memory_bytes(agent.device)
    # Collection: the policy in the loop (encoder + RSSM filter + actor per step) and rendering.
    obs, state, t = env.reset(), None, time.perf_counter()
    for _ in range(collect_steps):
        action, state = agent.act(obs, state, explore=True)
        obs, _, done, _ = env.step(action)
        if done:
            obs, state = env.reset(), None
    env_steps_per_s = collect_steps * cfg.action_repeat / (time.perf_counter() - t)
    replay_gb = replay_bytes_per_env_step(cfg, env.obs_shape, env.action_dim) * 1e6 / 1e9
    for k in ("sample_s", "world_model_s", "actor_s", "value_s", "update_s"):
        print(f"  median {k:15s} {median[k]:7.3f} s")
    print(f"  peak memory during updates: {peak / 2**30:.2f} GiB "
          f"({'GPU allocated' if agent.device.type == 'cuda' else 'process resident'})")
    print(f"  collection with the policy: {env_steps_per_s:.0f} env steps/s")
    print(f"  replay RAM per 1e6 env steps: {replay_gb:.2f} GB "
          f"({'uint8 images' if cfg.obs == 'pixels' else 'float32 state vectors'})")
    result = {**{k: round(v, 4) for k, v in median.items()}, "obs": cfg.obs,
              "env_steps_per_s": round(env_steps_per_s, 1), "device": str(agent.device),
              "cpu_isa": isa, "threads": torch.get_num_threads(), "precision": cfg.precision,
              "peak_memory_bytes": peak, "replay_gb_per_1m_env_steps": round(replay_gb, 3),
              "batch_size": cfg.batch_size, "batch_length": cfg.batch_length,
              "horizon": cfg.horizon, "updates_timed": updates}
    print(json.dumps(result), flush=True)
    return result


# ============================================================================================
# Ablations (python dreamer.py --ablation value|representation): the paper's comparisons
# ============================================================================================

# Fig. 7 (Sec. 6): Dreamer's V_λ against "no value", V_R (Eq. 4). Fig. 8 (Sec. 6): the world
# model learned by reconstruction, by contrastive estimation, or by predicting rewards alone.
# Each arm is an ordinary run in its own logdir, ROOT/ARM-sSEED, so the same command resumes all
# of them, and `python plot.py ROOT` draws the arms' mean ± std over the seeds run so far.
ABLATIONS = {"value": ("value_estimate", ("lambda", "reward")),
             "representation": ("representation", REPRESENTATIONS)}


def ablation_runs(kind, root, seed):
    """→ {arm: logdir} of one seed of an ablation: ROOT/ARM-sSEED."""
    _, arms = ABLATIONS[kind]
    return {arm: Path(root) / f"{arm}-s{seed}" for arm in arms}


def run_ablation(args, cfg, argv_flags):
    """Train the arms of ablation args.ablation side by side, as child processes of this file
    with the same flags (argv_flags) plus the arm's own value and logdir, the CPU's threads
    shared out among them; their output lines are prefixed with [arm]. Ctrl-C or SIGTERM is
    passed on to every arm, which saves its checkpoint (a second one stops them at once).
    → the first non-zero exit status of the arms, or 0."""
    field, arms = ABLATIONS[args.ablation]
    runs = ablation_runs(args.ablation, args.logdir, cfg.seed)
    threads = max(1, torch.get_num_threads() // len(arms))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print(f"ablation {args.ablation} on {args.env}: {', '.join(arms)} side by side, "
          f"{threads} thread(s) each, in {args.logdir}", flush=True)
    procs = {}
    for arm, logdir in runs.items():
        cmd = [sys.executable, os.path.abspath(__file__), *argv_flags, f"--{field}", arm,
               "--logdir", str(logdir)]
        # A new session: a Ctrl-C in the terminal reaches only this process, which passes it on
        # once, so that an arm sees one signal per Ctrl-C.
        procs[arm] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, bufsize=1,
                                      start_new_session=True)

    def pass_on(signum, frame):
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    old = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM)}

    def relay(arm, proc):
        for line in proc.stdout:
            print(f"[{arm}] {line}", end="", flush=True)

    relays = [threading.Thread(target=relay, args=item, daemon=True) for item in procs.items()]
    try:
        for t in relays:
            t.start()
        codes = {arm: proc.wait() for arm, proc in procs.items()}
        for t in relays:
            t.join()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    for arm, code in codes.items():
        print(f"{arm}: {'done' if code == 0 else f'exit status {code}'} ({runs[arm]})")
    print(f"draw the arms: python plot.py {args.logdir}")
    return next((code for code in codes.values() if code), 0)


# ============================================================================================
# Exercises (python dreamer.py --make-exercise NAMES --out FILE): a student copy of this file
# ============================================================================================

# Each gradable piece's body sits between two marker lines, at the body's indentation:
#     # EXERCISE name: a hint
#     …the reference body…
#     # END EXERCISE
# make_exercise writes a copy of this file in which the named bodies become one line,
#     raise NotImplementedError("Exercise name: a hint")
# and everything else (signatures, docstrings with shapes and equations, the marker line with its
# hint, the rest of the program) stays, so the copy imports and runs up to the missing piece.
# Graders are the tests whose names contain the exercise's name:
#     DREAMER_FILE=student/dreamer.py python -m pytest test_dreamer.py -k lambda_return
EXERCISE_START = re.compile(r"^(?P<indent> *)# EXERCISE (?P<name>\w+): (?P<hint>.+)$")

EXERCISE_END = re.compile(r"^ *# END EXERCISE\s*$")


def find_exercises(lines):
    """The marked bodies of a source file's lines → {name: (start, end, indent, hint)}, where
    lines[start] is the marker, lines[end] the END marker. Raises ValueError on a malformed or
    repeated marker (a defect of this file, caught by its tests)."""
    found, start = {}, None
    for i, line in enumerate(lines):
        m = EXERCISE_START.match(line)
        if m:
            if start is not None or m["name"] in found:
                raise ValueError(f"line {i + 1}: exercise {m['name']} opens inside another "
                                 f"or twice")
            start = (i, m)
        elif EXERCISE_END.match(line):
            if start is None:
                raise ValueError(f"line {i + 1}: END EXERCISE without an EXERCISE")
            (j, m), start = start, None
            found[m["name"]] = (j, i, m["indent"], m["hint"])
    if start is not None:
        raise ValueError(f"exercise {start[1]['name']} is never closed")
    return found


def make_exercise(names, out, source=__file__):
    """Write a student copy of `source` (this file) to `out`, with the bodies of `names` (a list,
    or ['all']) replaced by raise NotImplementedError("Exercise NAME: hint"). → the names cut.
    Raises UserError for an unknown name or when `out` exists (the reference, a student's work)."""
    lines = Path(source).read_text(encoding="utf-8").splitlines(keepends=True)
    found = find_exercises([line.rstrip("\r\n") for line in lines])
    names = list(found) if names == ["all"] else list(dict.fromkeys(names))   # no repeats
    unknown = [n for n in names if n not in found]
    if unknown or not names:
        raise UserError(f"unknown exercise {', '.join(unknown) or '(none given)'}; valid: "
                        f"{', '.join(found)}, or all (alone)")
    if Path(out).exists():   # never overwrite a student's work, nor the reference
        raise UserError(f"--out {out} exists; remove it first or choose another path")
    for name in sorted(names, key=lambda n: -found[n][0]):      # bottom up: indices stay valid
        start, end, indent, hint = found[name]
        message = repr(f"Exercise {name}: {hint}")
        lines[start + 1:end] = [f"{indent}raise NotImplementedError({message})\n"]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    text = "".join(lines).encode()
    save_atomically(out, lambda f: f.write(text))
    return names


def exercise_main(names, out):
    """python dreamer.py --make-exercise NAMES --out FILE (or --make-exercise list)."""
    if names == "list":
        found = find_exercises(Path(__file__).read_text(encoding="utf-8").splitlines())
        for name, (start, _, _, hint) in found.items():
            print(f"{name:26s} line {start + 2:5d}  {hint}")
        return 0
    if not out:
        raise UserError("--make-exercise needs --out FILE, the student copy to write")
    cut = make_exercise([n.strip() for n in names.split(",") if n.strip()], out)
    print(f"wrote {out}: {len(cut)} exercise{'s' * (len(cut) != 1)} to do ({', '.join(cut)})")
    tests = shlex.quote(str(Path(__file__).resolve().with_name("test_dreamer.py")))
    print(f"grade: DREAMER_FILE={shlex.quote(str(out))} python -m pytest {tests} "
          f"-k '{' or '.join(cut)}'")
    return 0


# ============================================================================================
# Configuration checks and presets
# ============================================================================================

# Named presets. "paper" is the default; anything smaller is a separate, named choice.
PRESETS = {
    "paper": {},
    # A smoke configuration: tiny networks and few steps, so that a whole run (collection,
    # training, evaluation, checkpoint) finishes in under 2 minutes on 2 CPU cores. It checks
    # that the machinery works; it is far too small and short to learn a task.
    "tiny": dict(steps=3000, seed_episodes=1, train_steps=5, batch_size=8, batch_length=16,
                 cnn_depth=4, deter_size=32, stoch_size=8, hidden_size=32, units=32,
                 horizon=5, eval_every=2000, checkpoint_every=2000),
    # Sized by measurement for one run on a 2-core CPU, so that 100k env steps take under 2 hours
    # (2-core AVX2 CPU, 2 threads: ~0.95 s per update, ~80 env steps/s collecting; a measured
    # run on reacher_easy took 1 h 58 min, so this is the most 2 hours hold; on a 2-core AVX-512
    # CPU, 1 h 21 min; twice the updates learned no more in one seed: results/README.md).
    # Compute per 1000 env steps is 45 updates of 8×50 sequences, ~7% of the paper's 100 of
    # 50×50; the networks are half as wide. Action repeat (2), 64×64 pixels, horizon, learning
    # rates and all loss terms are the paper's. README: "Presets and flags".
    "cpu": dict(steps=100_000, train_steps=45, batch_size=8, cnn_depth=16, units=200,
                shadow_size=256, eval_episodes=5),
    # Not in the paper: Dreamer from state vectors (--obs state), sized so that 100k env steps take
    # under 20 minutes on a 2-core CPU (measured: cartpole_swingup, 17 min 25 s on the 2-core
    # AVX-512 EPYC with 2 threads: ≈ 1.6 updates of B = 16 × 50 per second, imagination from the
    # B·L = 800 starts ≈ 70 % of each; ≈ 1,100 env steps/s collecting; 20 updates per 1000 env
    # steps would take ≈ 22 min at that pace). The actor's learning rate is 10× below the paper's
    # 8e-5, with which the actor collapsed from state (results/README.md, "State inputs").
    # README: "Presets and flags".
    "cpu-state": dict(obs="state", steps=100_000, batch_size=16, units=200, train_steps=15,
                      actor_lr=8e-6, eval_episodes=5),
    # The paper's discrete-action settings (appendix "Atari and DeepMind Lab"): H = 10, β = 0.1,
    # rewards bounded with tanh, ε-greedy (the epsilon_* defaults), a one-hot actor; and
    # [official code] a discount predictor with weight 10, action repeat 4, episodes capped at
    # 108,000 frames. For atari_ tasks these are the base under any preset (tiny, cpu), and
    # --preset atari is the paper's sizes on them. README: "Discrete actions and early episode
    # ends".
    "atari": dict(horizon=10, kl_scale=0.1, reward_transform="tanh", actor_dist="onehot",
                  discount_scale=10.0, action_repeat=4, time_limit=108_000),
}


# Environment seeds: training uses seed, the run's evaluations seed + EVAL_SEED_OFFSET and
# --evaluate seed + REEVAL_SEED_OFFSET, so that the three streams of initial states never meet.
EVAL_SEED_OFFSET, REEVAL_SEED_OFFSET = 10_000, 20_000


# Fields a resumed run may change; any other difference means a different experiment.
RESUMABLE_FIELDS = {"steps", "eval_every", "eval_episodes", "checkpoint_every", "replay_capacity"}


def validate(cfg):
    """Raise UserError for values that cannot work, so that a run never starts with them. The
    checks that need the task (its episode length) are in check_task_fits."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in ("precision", "value_estimate", "actor_dist", "return_norm",
                      "representation", "reward_transform", "obs", "state_transform"):
            continue
        if not math.isfinite(v):
            raise UserError(f"--{f.name} must be a finite number, got {v}")
        if f.name == "seed":
            if not 0 <= v < 2 ** 32 - REEVAL_SEED_OFFSET:   # room for the eval seeds
                raise UserError(f"--seed must be in [0, 2³² − {REEVAL_SEED_OFFSET:,}), got {v}")
            continue
        if f.name in ("free_nats", "expl_noise", "discount", "lam", "actor_entropy", "nstep_k",
                      "discount_scale", "epsilon_start", "epsilon_end", "epsilon_eval",
                      "replay_capacity"):
            if v < 0:
                raise UserError(f"--{f.name} must be ≥ 0, got {v}")
        elif v <= 0:
            raise UserError(f"--{f.name} must be > 0, got {v}")
    if cfg.value_estimate not in ("lambda", "nstep", "reward"):
        raise UserError(f"--value_estimate must be lambda, nstep or reward, got "
                        f"{cfg.value_estimate!r}")
    if cfg.discount_scale > 0 and cfg.value_estimate == "reward":
        raise UserError("--value_estimate reward (V_R, Eq. 4) sums rewards without discounts, "
                        "past a predicted episode end; it does not go with a discount predictor "
                        "(--discount_scale > 0, as on Atari)")
    if cfg.discount_scale > 0 and cfg.batch_length < 2:
        raise UserError("--batch_length must be ≥ 2 with a discount predictor: a chunk's last "
                        "state is no imagination start")
    if cfg.nstep_k and cfg.value_estimate != "nstep":
        raise UserError(f"--nstep_k is k of --value_estimate nstep; with "
                        f"--value_estimate {cfg.value_estimate} it would do nothing")
    if cfg.representation not in REPRESENTATIONS:
        raise UserError(f"--representation must be one of {', '.join(REPRESENTATIONS)}, got "
                        f"{cfg.representation!r}")
    if cfg.actor_dist not in ACTORS:
        raise UserError(f"--actor_dist must be one of {', '.join(ACTORS)}, got {cfg.actor_dist!r}")
    if cfg.return_norm not in RETURN_NORMS:
        raise UserError(f"--return_norm must be one of {', '.join(RETURN_NORMS)}, "
                        f"got {cfg.return_norm!r}")
    if cfg.actor_dist == "trunc_normal":
        for name in ("actor_mean_scale", "actor_init_std", "actor_min_std"):
            if getattr(cfg, name) != Config.__dataclass_fields__[name].default:
                raise UserError(f"--{name} shapes the tanh_normal actor only; the trunc_normal "
                                f"actor has DreamerV2's fixed bounds (μ in (−1, 1), σ in "
                                f"(0.1, 2.1))")
    if cfg.obs not in ("pixels", "state"):
        raise UserError(f"--obs must be pixels or state, got {cfg.obs!r}")
    if cfg.state_transform not in ("none", "symlog"):
        raise UserError(f"--state_transform must be none or symlog, got {cfg.state_transform!r}")
    if cfg.state_transform != "none" and cfg.obs != "state":
        raise UserError("--state_transform applies to state vectors (--obs state); with "
                        "--obs pixels it would do nothing")
    if cfg.reward_transform not in ("none", "tanh"):
        raise UserError(f"--reward_transform must be none or tanh, got {cfg.reward_transform!r}")
    if max(cfg.epsilon_start, cfg.epsilon_end, cfg.epsilon_eval) > 1:
        raise UserError(f"--epsilon_start, --epsilon_end and --epsilon_eval are probabilities, "
                        f"≤ 1; got {cfg.epsilon_start}, {cfg.epsilon_end} and {cfg.epsilon_eval}")
    if cfg.precision not in ("fp32", "bf16"):
        raise UserError(f"--precision must be fp32 or bf16, got {cfg.precision!r}")
    if cfg.shadow_size > 8192:
        raise UserError(f"--shadow_size must be at most 8192, got {cfg.shadow_size}")
    if cfg.discount > 1 or cfg.lam > 1:
        raise UserError(f"--discount and --lam must be ≤ 1, got {cfg.discount} and {cfg.lam}")
    if cfg.horizon < 2:
        # Eq. 6 gives returns for s_1 … s_{H−1} and bootstraps from v(s_H): H = 1 leaves no
        # imagined step for the actor or the value model to learn from.
        raise UserError(f"--horizon must be ≥ 2 (Eq. 6 needs a step before the bootstrap "
                        f"v(s_H)), got {cfg.horizon}")
    if cfg.time_limit % cfg.action_repeat:
        # Env steps are counted as agent steps × R; a last action repeated fewer than R times
        # would break that count (and the episode's row count).
        raise UserError(f"--time_limit {cfg.time_limit} must be a multiple of --action_repeat "
                        f"{cfg.action_repeat}")
    if cfg.batch_length > cfg.time_limit // cfg.action_repeat + 1:
        raise UserError(f"--batch_length {cfg.batch_length} is longer than an episode "
                        f"({cfg.time_limit // cfg.action_repeat + 1} rows)")


# Flags that shape only the continuous (DMC) agent: refused for Atari, where they do nothing.
CONTINUOUS_ONLY = ("shadow_size", "expl_noise", "actor_mean_scale", "actor_init_std",
                   "actor_min_std")


def check_task_config(cfg, task, given=()):
    """The checks that need the task's kind: the one-hot actor (without an entropy bonus) for
    discrete actions (Atari, a Gymnasium Discrete space) and no continuous-only flag there, no
    discrete actor or ε flag for continuous actions; what --obs the task can give. given: the
    flags the user typed (parse_args; the Trainer checks the config alone). Raises UserError."""
    if is_atari(task) and cfg.obs != "pixels":
        raise UserError(f"{task} is played from pixels; --obs {cfg.obs} is for DMC and gym: tasks")
    if is_gym(task):
        info = probe_gym(task)
        if cfg.obs == "state" and not info["state"]:
            raise UserError(f"{task}'s observations are {info['observation_space']}, not one "
                            f"Box of numbers; --obs state needs a Box (flatten a Dict with "
                            f"gymnasium.wrappers.FlattenObservation in your environment)")
        if cfg.obs == "pixels" and not info["pixels"]:
            raise UserError(f"{task} does not render rgb_array frames, so --obs pixels cannot "
                            f"see it; use --obs state")
    if is_discrete(task):
        if cfg.actor_dist != "onehot":
            raise UserError(f"{task} has discrete actions: the actor must be onehot, not "
                            f"--actor_dist {cfg.actor_dist}")
        if cfg.actor_entropy:
            # E_k[∇ −ln p_k] = 0: the one-sample entropy estimate gives no gradient here.
            raise UserError("--actor_entropy is not for the one-hot actor: the paper's discrete "
                            "actor has no entropy bonus, and ours would pass no gradient")
        wrong = [g for g in given if g[2:] in CONTINUOUS_ONLY]
        if wrong:
            raise UserError(f"{wrong[0]} shapes continuous actions (DMC) and does nothing for "
                            f"{task}; drop it")
    else:
        if cfg.actor_dist == "onehot":
            raise UserError(f"--actor_dist onehot is for discrete actions (atari_ tasks, "
                            f"Discrete gym: tasks); {task} has continuous ones")
        wrong = [g for g in given if g.startswith("--epsilon_")]
        if wrong:
            raise UserError(f"{wrong[0]} is ε-greedy exploration for discrete actions (atari_ "
                            f"tasks, Discrete gym: tasks); {task} explores with --expl_noise")


def check_task_fits(cfg, task, max_env_steps, can_end_early=False):
    """The checks of `validate` that need the task's own episode length (env steps, at most
    time_limit): a batch must fit in an episode, R must divide it, the replay must hold an
    episode, and --steps must reach past the seed episodes, or the run would end without a
    single update. Raises UserError."""
    rows = max_env_steps // cfg.action_repeat + 1
    if max_env_steps % cfg.action_repeat:
        raise UserError(f"{task} ends after {max_env_steps} env steps, not a multiple of "
                        f"--action_repeat {cfg.action_repeat}")
    if cfg.batch_length > rows:
        raise UserError(f"--batch_length {cfg.batch_length} is longer than an episode of "
                        f"{task} ({rows} rows: the task ends after {max_env_steps} env steps)")
    if 0 < cfg.replay_capacity < max_env_steps:
        raise UserError(f"--replay_capacity {cfg.replay_capacity} holds less than one episode of "
                        f"{task} ({max_env_steps} env steps); use at least that, or 0 for no "
                        f"bound")
    seeding = cfg.seed_episodes * max_env_steps
    if cfg.steps <= seeding and not can_end_early:   # (early ends: the seeding's length is unknown)
        raise UserError(f"--steps {cfg.steps} ends with the random seed episodes (S = "
                        f"{cfg.seed_episodes}, {seeding} env steps), before the first update; raise "
                        f"--steps above {seeding} or lower --seed_episodes")


# ============================================================================================
# main(): command line
# ============================================================================================

class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one clear line instead of usage + message
        raise UserError(f"{message} (see --help)")


def build_parser():
    p = _Parser(description="Dreamer (Hafner et al., ICLR 2020) on DeepMind Control and Atari "
                            "from pixels; from state vectors, and on Gymnasium environments.")
    # --env and --preset default to None so that --evaluate can tell that they were given.
    p.add_argument("--env", default=None,
                   help="DMC task as domain_task, e.g. reacher_easy or cup_catch, an Atari "
                        "game as atari_GAME, e.g. atari_pong, or a Gymnasium environment as "
                        "gym:ID or gym:module:ID, e.g. gym:Pendulum-v1 (default: reacher_easy)")
    p.add_argument("--preset", default=None,
                   help=f"named configuration: {', '.join(PRESETS)} (default: paper); "
                        f"flags below override it")
    p.add_argument("--logdir", default=None, help="run folder (default: runs/ENV-PRESET-sSEED)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--benchmark", action="store_true",
                   help="time updates and collection at the chosen config, print JSON, exit")
    p.add_argument("--evaluate", metavar="RUN", default=None,
                   help="evaluate the policy in RUN's checkpoint on --eval_episodes new "
                        "episodes (default: the run's own number), print the returns, exit")
    p.add_argument("--make-exercise", "--make_exercise", metavar="NAMES", default=None,
                   help="write a student copy of this file to --out with the bodies of NAMES "
                        "(comma-separated, or all) cut out; 'list' lists them; exit")
    p.add_argument("--out", metavar="FILE", default=None, help="where --make-exercise writes")
    p.add_argument("--ablation", default=None,
                   help="train the arms of one of the paper's ablations side by side: value "
                        "(--value_estimate lambda, reward: Fig. 7) or representation "
                        "(--representation reconstruction, contrastive, reward: Fig. 8), each "
                        "in LOGDIR/ARM-sSEED (default LOGDIR: runs/ablation-KIND-ENV-PRESET)")
    for f in dataclasses.fields(Config):
        # default=None so we can tell a flag the user gave from one the preset should set.
        p.add_argument(f"--{f.name}", type=f.type,
                       default=None, help=f"{f.metadata['help']} [default: {f.default}]")
    return p


def gym_base(task, given):
    """The settings a gym:ID task brings, under any preset: its own time limit (a --time_limit
    given replaces it), the one-hot actor for a Discrete action space, and (Gymnasium
    environments may end early: CartPole's pole falls) the discount predictor, weight 10 as on
    Atari [official code]; --discount_scale 0 turns it off for one that never ends early."""
    info = probe_gym(task)
    values = {"discount_scale": 10.0}
    if info["discrete"]:
        values["actor_dist"] = "onehot"
    if info["max_episode_steps"]:
        values["time_limit"] = int(info["max_episode_steps"])
    elif "--time_limit" not in given:
        raise UserError(f"{task} has no time limit of its own (max_episode_steps); pass "
                        f"--time_limit N (env steps)")
    return values


def parse_args(argv=None):
    """→ (cfg, args). Preset first, then explicit flags; raises UserError on bad input."""
    args = build_parser().parse_args(argv)
    given = [f"--{k}" for k in ("env", "preset", "logdir", "device", "evaluate")
             if getattr(args, k) is not None]
    given += [f"--{f.name}" for f in dataclasses.fields(Config)
              if getattr(args, f.name) is not None]
    given += ["--benchmark"] * args.benchmark
    given += ["--ablation"] * (args.ablation is not None)
    if args.make_exercise is not None:
        if given:
            raise UserError(f"--make-exercise takes only --out besides, not {' '.join(given)}")
        return None, args
    if args.out is not None:
        raise UserError("--out goes with --make-exercise")
    if args.evaluate is not None:
        # The run's config.json decides everything but the number of episodes and the device.
        extra = [g for g in given if g not in ("--evaluate", "--device", "--eval_episodes")]
        if not args.evaluate:
            raise UserError("--evaluate needs a run folder")
        if extra:
            raise UserError(f"--evaluate takes only --eval_episodes and --device besides (the "
                            f"run's config.json decides the rest), not {' '.join(extra)}")
    args.env = "reacher_easy" if args.env is None else args.env
    args.preset = "paper" if args.preset is None else args.preset
    if args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r}; valid presets: {', '.join(PRESETS)}")
    if args.preset == "atari" and not is_atari(args.env):
        raise UserError(f"--preset atari is for atari_ tasks, not {args.env}")
    # Atari's settings (the paper's discrete ones) are the base for atari_ tasks, under any
    # preset; a Gymnasium task's base is its own time limit and kind of actions (gym_base).
    values = dict(PRESETS["atari"]) if is_atari(args.env) else {}
    if is_gym(args.env):
        values = gym_base(args.env, given)
    values.update(PRESETS[args.preset])
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                   if getattr(args, f.name) is not None})
    cfg = Config(**values)
    validate(cfg)
    parse_task(args.env)
    check_task_config(cfg, args.env, given)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} asked for, but torch sees no CUDA device")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"unknown --device {args.device!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {args.device}: torch sees {torch.cuda.device_count()} CUDA "
                        f"device(s), numbered from 0")
    if args.logdir == "":
        raise UserError("--logdir needs a folder name")
    if args.ablation is not None:
        if args.ablation not in ABLATIONS:
            raise UserError(f"unknown ablation {args.ablation!r}; valid: {', '.join(ABLATIONS)}")
        field = ABLATIONS[args.ablation][0]
        clash = [g for g in given if g in (f"--{field}", "--evaluate", "--benchmark")]
        if clash:
            raise UserError(f"--ablation {args.ablation} sets --{field} itself and only trains; "
                            f"drop {' '.join(clash)}")
        for arm in ABLATIONS[args.ablation][1]:   # every arm can run, or none starts
            try:
                arm_cfg = dataclasses.replace(cfg, **{field: arm})
                validate(arm_cfg)
                check_task_config(arm_cfg, args.env)
            except UserError as e:
                raise UserError(f"--ablation {args.ablation}: its {arm} arm (--{field} {arm}) "
                                f"cannot run on {args.env}: {e}") from None
        # What each arm is started with: the task, preset and device, and the flags given.
        args.arm_flags = ["--env", args.env, "--preset", args.preset, "--device", args.device]
        for f in dataclasses.fields(Config):
            if getattr(args, f.name) is not None:
                args.arm_flags += [f"--{f.name}", str(getattr(args, f.name))]
        if args.logdir is None:
            args.logdir = os.path.join("runs", f"ablation-{args.ablation}-"
                                               f"{args.env.replace(':', '-')}-{args.preset}")
    if args.logdir is None:
        args.logdir = os.path.join("runs", f"{args.env.replace(':', '-')}-{args.preset}-s{cfg.seed}")
    return cfg, args


def main(argv=None):
    """Train (or resume) a run, or --benchmark, or --evaluate RUN. Returns the exit status:
    0 done, 1 a fault during the run (RunError, out of memory, a failed read or write),
    2 bad input, 130 interrupted (143 by SIGTERM). A non-zero status comes with a line on stderr."""
    args = None
    try:
        cfg, args = parse_args(argv)
        if args.make_exercise is not None:
            return exercise_main(args.make_exercise, args.out)
        if cfg.precision == "bf16" and not bf16_is_native(torch.device(args.device)):
            print(f"dreamer.py: warning: {args.device} has no native bfloat16 arithmetic; "
                  f"--precision bf16 will be several times slower than fp32 here",
                  file=sys.stderr, flush=True)
        if args.benchmark:
            benchmark(cfg, args.env, args.device)
            return 0
        if args.evaluate is not None:
            evaluate_run(args.evaluate, args.eval_episodes, args.device)
            return 0
        if args.ablation is not None:
            return run_ablation(args, cfg, args.arm_flags)
        trainer = Trainer(cfg, args.env, args.logdir, args.device)
        agent = trainer.agent
        wm = agent.world_model
        counts = {"encoder": wm.encoder, "rssm": wm.rssm, "decoder": wm.decoder,
                  "state model": wm.state_model, "reward": wm.reward,
                  "discount": wm.discount, "world model": wm,
                  "actor": agent.actor, "value": agent.value}
        print(f"Dreamer on {args.env} | preset {args.preset} | device {args.device} "
              f"({torch.get_num_threads()} threads) | logdir {args.logdir}")
        print("parameters: " + " · ".join(f"{k} {count_parameters(m):,}"
                                          for k, m in counts.items() if m is not None),
              flush=True)
        note, fits = replay_memory_note(cfg, trainer.env.obs_shape, trainer.env.action_dim,
                                        available_memory())
        print(note if fits else f"warning: {note}", flush=True)
        try:
            return trainer.run()        # handles Ctrl-C itself once training has started
        finally:
            trainer.lock.close()        # frees the logdir for the next run (also in-process)
    except UserError as e:
        print(f"dreamer.py: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"dreamer.py: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:   # a read or write outside the logdir's checks, e.g. a full disk
        logdir = getattr(args, "logdir", None)
        if logdir and not Path(logdir).is_dir() and getattr(e, "filename", None):
            print(f"dreamer.py: error: the logdir {logdir} was moved or deleted while the run "
                  f"used it ({one_line(e)}); what was written before is wherever it went",
                  file=sys.stderr)
            return 1
        print(f"dreamer.py: error: {one_line(e)}", file=sys.stderr)
        return 1
    except NotImplementedError as e:
        if not str(e).startswith("Exercise "):
            raise
        print(f"dreamer.py: error: not implemented yet: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if not out_of_memory(e):
            raise                       # a bug: its traceback is what a developer needs
        print(f"dreamer.py: error: out of memory ({one_line(e)}); free memory, or lower "
              f"--batch_size, --batch_length or the network sizes", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; no checkpoint or episode was written", file=sys.stderr)
        return 130

if __name__ == "__main__":
    sys.exit(main())
