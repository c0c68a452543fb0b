"""Plot return against env steps from Dreamer runs' metrics.jsonl files.

    python plot.py runs/reacher_easy-paper-s0                       # → runs/.../curves.png
    python plot.py runs/reacher_easy-cpu-s* --out curves.png        # several seeds, one plot
    python plot.py RUN --metric train/return                        # another logged metric
    python plot.py RUN --openloop                                   # → RUN/openloop.png

--openloop shows what the run's world model (its latest checkpoint) sees in one replay episode
(default: the latest): 5 frames reconstructed from the images, then 45 predicted from the
actions alone, as in imagination, next to the real frames, and predicted against real rewards.

Each run is one line; with several runs of one task the mean ± std over runs (at the steps they
share) is drawn too. Published Dreamer scores at 100k and 500k env steps are marked where known.
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Dreamer's evaluation return, mean ± std over seeds, at 100k and 500k env steps: CURL paper
# (Srinivas et al. 2020), Table 1, numbers supplied by the Dreamer authors.
PUBLISHED = {
    "reacher_easy": {100_000: (314, 155), 500_000: (793, 164)},
    "cartpole_swingup": {100_000: (326, 27), 500_000: (762, 27)},
    "finger_spin": {100_000: (341, 70), 500_000: (796, 183)},
    "cheetah_run": {100_000: (235, 137), 500_000: (570, 253)},
    "walker_walk": {100_000: (277, 12), 500_000: (897, 49)},
    "ball_in_cup_catch": {100_000: (246, 174), 500_000: (879, 87)},
    "cup_catch": {100_000: (246, 174), 500_000: (879, 87)},
}


def load_run(run):
    """→ (task name or None, {metric: (steps array, values array)})."""
    run = Path(run)
    path = run / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"plot.py: error: {path} not found (is {run} a Dreamer logdir?)")
    series = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            print(f"plot.py: skipping unreadable line {n} of {path}", file=sys.stderr)
            continue
        for key, value in record.items():
            if key != "step":
                series.setdefault(key, {})[record["step"]] = value   # a resumed step: last wins
    config = run / "config.json"
    task = json.loads(config.read_text()).get("task") if config.exists() else None
    # A value logged as null (a NaN, in strict JSON) reads back as NaN.
    return task, {k: (np.array(sorted(v)), np.array([v[s] for s in sorted(v)], dtype=float))
                  for k, v in series.items()}


def draw_open_loop(run, episode, start, out):
    """The world model's open-loop prediction of one replay chunk (dreamer.open_loop) as a PNG:
    real frames, predicted frames, their difference, and real vs predicted rewards."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import dreamer   # torch is only needed here, so it is imported only here
    import torch
    run = Path(run)
    files = sorted((run / "episodes").glob("*.npz"))
    try:
        wm, _ = dreamer.load_world_model(run)
        path = files[episode]
        with np.load(path) as data:
            chunk = {k: data[k] for k in ("obs", "action", "reward")}
        torch.manual_seed(0)
        r = dreamer.open_loop(wm, chunk, start=start, length=50, context=5)
    except IndexError:
        raise SystemExit(f"plot.py: error: {run} has {len(files)} episode files; "
                         f"--episode {episode} is not one of them") from None
    except (dreamer.UserError, OSError, ValueError, KeyError) as e:
        raise SystemExit(f"plot.py: error: {e}") from None
    L, C = len(r["reward"]), r["context"]
    cols = np.linspace(0, L - 1, 10).round().astype(int)
    fig = plt.figure(figsize=(12, 6.2))
    grid = fig.add_gridspec(4, len(cols), height_ratios=[1, 1, 1, 1.4])
    error = np.abs(r["obs"].astype(int) - r["model"].astype(int)).astype(np.uint8)
    for row, (name, images) in enumerate([("real", r["obs"]), ("model", r["model"]),
                                          ("|real − model|", error)]):
        for col, t in enumerate(cols):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(images[t].transpose(1, 2, 0))
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(f"t={start + t}" + (" rec" if t < C else ""), fontsize=8)
            if col == 0:
                ax.set_ylabel(name, fontsize=9)
    ax = fig.add_subplot(grid[3, :])
    steps = start + np.arange(L)
    ax.plot(steps, r["reward"], label="real reward", color="black")
    ax.plot(steps, r["reward_pred"], label="predicted reward", color="crimson")
    ax.axvspan(start, start + C - 0.5, color="grey", alpha=0.2, label="seen images (context)")
    ax.set_xlabel("agent step in the episode")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(f"{run.name}: {path.name}, {C} frames reconstructed, then open-loop "
                 f"(world model at its latest checkpoint)", fontsize=10)
    fig.tight_layout()
    out = Path(out) if out else run / "openloop.png"
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="logdirs holding metrics.jsonl")
    p.add_argument("--metric", default="eval/return", help="metric to plot (default eval/return)")
    p.add_argument("--out", default=None, help="PNG path (default: RUN/curves.png for one run, "
                                                "curves.png for several)")
    p.add_argument("--openloop", action="store_true",
                   help="draw the first run's open-loop world-model prediction instead")
    p.add_argument("--episode", type=int, default=-1,
                   help="with --openloop: index of the episode file (default -1, the latest)")
    p.add_argument("--start", type=int, default=0,
                   help="with --openloop: first agent step of the 50-step chunk (default 0)")
    args = p.parse_args(argv)
    if args.openloop:
        if args.start < 0:
            raise SystemExit(f"plot.py: error: --start must be ≥ 0, got {args.start}")
        return draw_open_loop(args.runs[0], args.episode, args.start, args.out)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_task = {}
    for run in args.runs:
        task, series = load_run(run)
        if args.metric not in series:
            print(f"plot.py: {run} has no {args.metric!r} yet; skipped", file=sys.stderr)
            continue
        x, y = series[args.metric]
        ax.plot(x, y, marker=".", alpha=0.6 if len(args.runs) > 1 else 1, label=Path(run).name)
        by_task.setdefault(task, []).append((x, y))
    for task, curves in by_task.items():
        if len(curves) > 1:                      # mean ± std over runs, at their shared steps
            shared = sorted(set.intersection(*(set(x.tolist()) for x, _ in curves)))
            if shared:
                ys = np.array([[dict(zip(x.tolist(), y))[s] for s in shared] for x, y in curves])
                m, s = ys.mean(0), ys.std(0)
                ax.plot(shared, m, color="black", lw=2, label=f"{task}: mean of {len(curves)}")
                ax.fill_between(shared, m - s, m + s, color="black", alpha=0.1)
        published = PUBLISHED.get(task, {}) if args.metric == "eval/return" else {}
        for step, (mean, std) in published.items():
            ax.errorbar([step], [mean], yerr=[std], fmt="*", ms=12, capsize=4, color="crimson",
                        label=f"published Dreamer {step // 1000}k (CURL Table 1)")
    if not by_task:
        raise SystemExit(f"plot.py: error: no run has {args.metric!r}")
    ax.set_xlabel("env steps (after action repeat)")
    ax.set_ylabel(args.metric)
    ax.set_title(", ".join(str(t) for t in by_task))
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.grid(alpha=0.3)
    out = Path(args.out) if args.out else (Path(args.runs[0]) / "curves.png"
                                           if len(args.runs) == 1 else Path("curves.png"))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
