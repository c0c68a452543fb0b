# Random-action episodes (uniform in [-1, 1], action repeat 2, as the seed episodes) on
# reacher_easy, physics only: return by the target's distance from the centre.
# Usage: python results/reward-probe-100k/random_episodes.py 200
import numpy as np
from dm_control import suite
rng = np.random.default_rng(0)
bins = [0.05, 0.09, 0.13, 0.17, 0.20001]; res = {i: [] for i in range(4)}
for ep in range(int(__import__("sys").argv[1])):
    env = suite.load("reacher", "easy", task_kwargs={"random": 1000 + ep})
    ts = env.reset(); p = env.physics
    d = np.linalg.norm(p.named.data.geom_xpos['target', :2]); ret = 0.0
    while not ts.last():
        a = rng.uniform(-1, 1, 2)
        for _ in range(2):
            ts = env.step(a); ret += ts.reward or 0.0
            if ts.last(): break
    res[np.searchsorted(bins, d) - 1].append(ret)
for i in range(4):
    r = np.array(res[i]); print(f"{bins[i]:.2f}-{bins[i+1]:.2f}: n={len(r)} mean {r.mean():.1f} median {np.median(r):.1f} >0: {np.mean(r>0):.2f} best {r.max():.0f}")
