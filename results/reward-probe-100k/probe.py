# Is the reward model's failure at far targets a fit problem or a data problem?
# Usage (from the repo root): [NR=30] python results/reward-probe-100k/probe.py RUNDIR N K1,K2
# NR random-action episodes (env seed 4000) are added to the replay first (0: none).
# Probe: posterior r̂ summed over scripted reaches (env seed 777), before and after
#  P: a fresh reward head trained hard on frozen posterior features of the replay
#  W(k): N more world-model updates on the replay with the reward term scaled by k.
import sys, os, copy, time, numpy as np, torch, torch.nn.functional as F
os.environ.setdefault("MUJOCO_GL", "egl")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))   # the repo root, for dreamer.py
import dreamer as D
torch.set_num_threads(2)
logdir = sys.argv[1]; N = int(sys.argv[2]); ks = [float(k) for k in sys.argv[3].split(",")]
task, cfg, state = D.read_run(logdir)
agent = D.Dreamer(cfg, 2)
for k, m in agent.modules().items(): m.load_state_dict(state[k])
rb = D.ReplayBuffer(os.path.join(logdir, "episodes"), seed=1); rb.load()
NR = int(os.environ.get("NR", "0"))
if NR:
    rc = os.path.join(HERE, f"random{NR}.npz")
    if not os.path.exists(rc):
        envr = D.make_env("reacher_easy", 2, 1000, seed=4000, shadow_size=cfg.shadow_size)
        rs = np.random.default_rng(0)
        eps = [D.run_episode(envr, lambda o, s: (rs.uniform(-1, 1, 2).astype(np.float32), None))[0] for _ in range(NR)]
        np.savez(rc, **{k: np.stack([e[k] for e in eps]) for k in eps[0]})
    R = dict(np.load(rc))
    for i in range(NR): rb.episodes.append({k: R[k][i] for k in R})
    print("random returns", R["reward"].sum(1))
print("replay episodes", len(rb.episodes), flush=True)
cache = os.path.join(HERE, "scripted777.npz")
L1 = L2 = 0.12
def wrap(a): return (a + np.pi) % (2 * np.pi) - np.pi
if not os.path.exists(cache):
    env = D.make_env("reacher_easy", 2, 1000, seed=777, shadow_size=cfg.shadow_size)
    def scripted(obs, s):
        p = env.env.physics; t = p.named.data.geom_xpos['target', :2]; r = np.linalg.norm(t)
        q = p.named.data.qpos[:]; v = p.named.data.qvel[:]
        q2 = np.arccos(np.clip((r*r - L1*L1 - L2*L2) / (2*L1*L2), -1, 1)) * (1 if q[1] >= 0 else -1)
        q1 = np.arctan2(t[1], t[0]) - np.arctan2(L2*np.sin(q2), L1 + L2*np.cos(q2))
        return np.clip(5*np.array([wrap(q1 - q[0]), q2 - q[1]]) - 0.5*v, -1, 1).astype(np.float32), s
    eps, dists = [], []
    for i in range(8):
        ep, ret = D.run_episode(env, scripted)
        eps.append(ep); dists.append(np.linalg.norm(env.env.physics.named.data.geom_xpos['target', :2]))
    np.savez(cache, obs=np.stack([e["obs"] for e in eps]), action=np.stack([e["action"] for e in eps]),
             reward=np.stack([e["reward"] for e in eps]), dist=np.array(dists))
S = dict(np.load(cache))
order = np.argsort(S["dist"])
print("scripted targets", np.round(S["dist"][order], 3), "returns", S["reward"].sum(1)[order], flush=True)

@torch.no_grad()
def feats(wm, obs, act):
    s = wm.rssm.observe(wm.encoder(D.preprocess(torch.as_tensor(obs))), torch.as_tensor(act))
    return torch.cat([s["z"], s["h"]], -1)

def probe(wm, head=None, tag=""):
    f = feats(wm, S["obs"], S["action"])                       # [8, T+1, F]
    with torch.no_grad():
        r = (head or wm.reward)(f).numpy()
    real = S["reward"]
    pred = r.sum(1)[order]; inside = [r[i][real[i] > 0].mean() for i in order]
    print(f"{tag:>12} predicted return " + " ".join(f"{p:7.1f}" for p in pred)
          + " | r̂ in target " + " ".join(f"{x:5.2f}" for x in inside), flush=True)

probe(agent.world_model, tag="checkpoint")
# P: fresh reward head on frozen features of the whole replay.
t0 = time.time()
F_all, R_all = [], []
for ep in rb.episodes:
    F_all.append(feats(agent.world_model, ep["obs"][None], ep["action"][None])[0]); R_all.append(torch.as_tensor(ep["reward"]))
F_all, R_all = torch.cat(F_all), torch.cat(R_all)
print(f"features {tuple(F_all.shape)} in {time.time()-t0:.0f}s; replay reward>0 frac {(R_all>0).float().mean():.3f}", flush=True)
head = D.RewardModel(cfg, F_all.shape[1]); D.init_like_keras(head)
opt = torch.optim.Adam(head.parameters(), 1e-3)
g = torch.Generator().manual_seed(0)
for it in range(4000):
    idx = torch.randint(len(F_all), (1024,), generator=g)
    loss = F.mse_loss(head(F_all[idx]), R_all[idx]); opt.zero_grad(); loss.backward(); opt.step()
with torch.no_grad(): full = F.mse_loss(head(F_all), R_all).item()
print(f"P: head mse on replay {full:.4f} (checkpoint head "
      f"{F.mse_loss(agent.world_model.reward(F_all).detach(), R_all).item():.4f})", flush=True)
probe(agent.world_model, head, tag="P fresh head")
# W(k)
for k in ks:
    wm = copy.deepcopy(agent.world_model)
    opt = torch.optim.Adam(wm.parameters(), cfg.model_lr, eps=cfg.adam_eps)
    opt.load_state_dict(state["model_opt"])
    rb.rng = np.random.default_rng(5)
    t0 = time.time()
    for it in range(N):
        b = {kk: torch.as_tensor(v) for kk, v in rb.sample(cfg.batch_size, cfg.batch_length).items()}
        obs = D.preprocess(b["obs"]); s = wm.rssm.observe(wm.encoder(obs), b["action"])
        feat = torch.cat([s["z"], s["h"]], -1)
        img = 0.5 * F.mse_loss(wm.decoder(feat), obs, reduction="sum") / (obs.shape[0] * obs.shape[1])
        rew = 0.5 * ((wm.reward(feat) - b["reward"]) ** 2).mean()
        kl = D.kl_gaussian(s["post_mean"], s["post_std"], s["prior_mean"], s["prior_std"]).sum(-1).mean()
        loss = torch.clamp(kl, min=cfg.free_nats) + img + k * rew
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(wm.parameters(), cfg.grad_clip); opt.step()
        if (it + 1) % max(1, N // 4) == 0:
            print(f"  k={k} it {it+1} img {img.item():.2f} rew {rew.item():.4f} kl {kl.item():.2f} ({time.time()-t0:.0f}s)", flush=True)
    probe(wm, tag=f"W k={k:g}")
