# The actor's pre-tanh mean μ and std σ on the run's own replay states (posterior).
import sys, os
import numpy as np, torch
sys.path.insert(0, os.getcwd())
import dreamer as D
torch.set_num_threads(2)
logdir = sys.argv[1]; replay = sys.argv[2] if len(sys.argv) > 2 else logdir
task, cfg, state = D.read_run(logdir)
agent = D.Dreamer(cfg, 2, torch.device("cpu"))
for k, m in agent.modules().items(): m.load_state_dict(state[k])
buf = D.ReplayBuffer(os.path.join(replay, "episodes"), seed=0); buf.load()
D.seed_everything(0)
with torch.no_grad():
    b = buf.sample(16, 50); b = {k: torch.as_tensor(v) for k, v in b.items()}
    wm = agent.world_model
    s = wm.rssm.observe(wm.encoder(D.preprocess(b["obs"])), b["action"])
    feat = torch.cat([s["z"], s["h"]], -1).reshape(-1, cfg.stoch_size + cfg.deter_size)
    mu, sd = agent.actor.dist_params(feat)
    g = 1 - torch.tanh(mu) ** 2                      # ∂tanh(μ)/∂μ
for j, n in enumerate(["shoulder", "wrist"]):
    m, s_, gj = mu[:, j].abs().numpy(), sd[:, j].numpy(), g[:, j].numpy()
    print(f"{logdir} {n}: |μ| median {np.median(m):.2f}, |μ|>1.83 (tanh>0.95) {np.mean(m>1.83):.2f}, "
          f"|μ|>3 {np.mean(m>3):.2f} | σ median {np.median(s_):.3f} (10-90%: {np.percentile(s_,10):.3f}-{np.percentile(s_,90):.3f})"
          f" | 1−tanh²μ median {np.median(gj):.4f}")
