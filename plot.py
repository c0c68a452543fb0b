"""Pictures of Dreamer runs: return curves, what the world model predicts, the agent at work.

    python plot.py runs/reacher_easy-paper-s0                       # → runs/.../curves.png
    python plot.py runs/reacher_easy-cpu-s* --out curves.png        # several seeds, one plot
    python plot.py RUN --metric train/return                        # another logged metric
    python plot.py RUN --openloop         # → RUN/openloop.png and RUN/openloop-error.png
    python plot.py RUN --video            # → RUN/video.gif
    python plot.py runs/ablation-value-reacher_easy-cpu   # an ablation's arms → .../curves.png

Curves: each run is one line; with several runs of one task the mean ± std over runs (at the
steps they share) is drawn too. Published Dreamer scores at 100k and 500k env steps are marked
where known. An ablation's folder (dreamer.py --ablation) draws one colour per arm: its seeds
thin, their mean ± std thick.

--openloop and --video use the run's latest checkpoint (a weights-only one is enough) on an
episode its policy plays now (mode, no exploration noise, new initial states, as
`dreamer.py --evaluate` plays them), or on a replay episode of the run with --episode I.
--openloop draws one 50-step chunk: 5 images reconstructed, then 45 predicted from the actions
alone, as in imagination, next to the real frames, and predicted against real rewards
(openloop.png); and the prediction error against the horizon k = 1 … 45 steps after the last
seen image, open loop beside filtered (every image seen), printed and drawn
(openloop-error.png). --video writes the episode as a GIF: real | model | |real − model|, the
model's frames predicted open loop in 50-step chunks after 5 seen images each. For a run that saw
state vectors (--obs state) --openloop draws each state dimension, real against open-loop and
filtered predictions, and --video shows the rendered frames beside the state curves.
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


def load_episodes(run, episode, count, video=False):
    """The run's agent (dreamer.load_agent) and the episodes the pictures show: `count` new
    episodes of its policy (episode None) or its replay file number `episode`. → (dreamer module,
    Config, agent, [(episode dict, return)], source as words). Exits with one line on errors."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import dreamer   # torch is only needed for these pictures, so it is imported only here
    run = Path(run)
    try:
        task, cfg, agent, _ = dreamer.load_agent(run)
        dreamer.require_decoder(agent.world_model)   # before playing: nothing to draw without
        if episode is None:
            # A state run's video shows the frames a person sees beside the state curves.
            frames = video and cfg.obs == "state"
            episodes = list(dreamer.play(task, cfg, agent, count, frames=frames))
            return dreamer, cfg, agent, episodes, (f"{count} new episode{'s' * (count > 1)} "
                                                   f"of its policy")
        files = sorted((run / "episodes").glob("*.npz"))
        if not -len(files) <= episode < len(files):
            raise SystemExit(f"plot.py: error: {run} has {len(files)} episode files; "
                             f"--episode {episode} is not one of them")
        with np.load(files[episode]) as data:
            replayed = {k: data[k] for k in ("obs", "action", "reward")}
        return dreamer, cfg, agent, [(replayed, float(replayed["reward"].sum()))], \
            f"replay episode {files[episode].name}"
    except (dreamer.UserError, dreamer.RunError, OSError, ValueError, KeyError) as e:
        raise SystemExit(f"plot.py: error: {e}") from None


def draw_open_loop(dreamer, wm, cfg, episodes, source, start, title, out):
    """One chunk's open-loop prediction (dreamer.open_loop) as a PNG: real frames, predicted
    frames, their difference, and real vs predicted rewards (a state run: each state dimension,
    draw_state_open_loop); then the prediction error against the horizon
    (dreamer.prediction_error), printed and drawn beside it (out's stem + -error)."""
    import torch
    torch.manual_seed(0)
    rows = min(len(ep["reward"]) for ep, _ in episodes)
    try:
        r = dreamer.open_loop(wm, episodes[0][0], start=start, length=50, context=5)
        error = dreamer.prediction_error(wm, [ep for ep, _ in episodes],
                                         horizon=min(45, rows - 5), context=5)
    except dreamer.UserError as e:
        raise SystemExit(f"plot.py: error: {e}") from None
    first = source if len(episodes) == 1 else f"the first of {source}"
    state = r["obs"].ndim == 2                              # state vectors (--obs state)
    (draw_state_open_loop if state else draw_image_open_loop)(r, start, first, title, out)
    draw_error(error, cfg, source, title, state, out)


def draw_image_open_loop(r, start, first, title, out):
    """Real frames, predicted frames, their difference, and real vs predicted rewards."""
    L, C = len(r["reward"]), r["context"]
    cols = np.linspace(0, L - 1, 10).round().astype(int)
    fig = plt.figure(figsize=(12, 6.2))
    grid = fig.add_gridspec(4, len(cols), height_ratios=[1, 1, 1, 1.4])
    diff = np.abs(r["obs"].astype(int) - r["model"].astype(int)).astype(np.uint8)
    for row, (name, images) in enumerate([("real", r["obs"]), ("model", r["model"]),
                                          ("|real − model|", diff)]):
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
    fig.suptitle(f"{title}: {first}, {C} frames reconstructed, then open loop", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


def draw_state_open_loop(r, start, first, title, out, most=12):
    """Per state dimension (the first `most`): the real values, the open-loop prediction and the
    filtered one (posterior, every observation seen), in the environment's units; then rewards."""
    L, C, O = len(r["reward"]), r["context"], r["obs"].shape[1]
    dims = min(O, most)
    cols = 3
    rows = -(-(dims + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 2.2 * rows), squeeze=False)
    steps = start + np.arange(L)
    panels = [(f"state[{i}]", r["obs"][:, i], r["model"][:, i], r["filtered"][:, i])
              for i in range(dims)] + [("reward", r["reward"], r["reward_pred"], None)]
    for ax, (name, real, model, filtered) in zip(axes.flat, panels):
        ax.plot(steps, real, color="black", label="real")
        ax.plot(steps, model, color="crimson", label="open loop (prior)")
        if filtered is not None:
            ax.plot(steps, filtered, color="grey", ls="--", label="filtered (posterior)")
        ax.axvspan(start, start + C - 0.5, color="grey", alpha=0.2)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    shown = "" if dims == O else f" (the first {dims} of {O} dimensions)"
    fig.suptitle(f"{title}: {first}, {C} states seen (shaded), then open loop{shown}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


def draw_error(error, cfg, source, title, state, out):
    """The prediction error against the horizon, printed and drawn (out's stem + -error)."""
    seen = "state" if state else "image"
    k = np.arange(1, len(error["image_open"]) + 1)
    print(f"prediction error against the horizon k (steps after the last of 5 seen {seen}s), "
          f"{error['chunks']} chunks of {source}:")
    print(f"    k | {seen} MSE open loop  filtered | reward |error| open loop  filtered")
    for i in [i for i in (1, 2, 5, 10, 15, 20, 30, 45) if i <= len(k)]:
        print(f"  {i:3d} | {error['image_open'][i - 1]:19.5f} {error['image_filtered'][i - 1]:9.5f}"
              f" | {error['reward_open'][i - 1]:26.4f} {error['reward_filtered'][i - 1]:9.4f}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    first = ("state: per-entry MSE (as the model sees it)" if state
             else "image: per-pixel MSE (pixels in [0, 1])")
    for ax, kind, label in ((axes[0], "image", first),
                            (axes[1], "reward", "reward: mean |predicted − real|")):
        ax.plot(k, error[f"{kind}_open"], marker=".", color="crimson",
                label="open loop (prior, actions only)")
        ax.plot(k, error[f"{kind}_filtered"], marker=".", color="black",
                label=f"filtered (posterior, {seen} seen)")
        ax.axvline(cfg.horizon, color="grey", ls="--", label=f"imagination horizon H = {cfg.horizon}")
        ax.set_xlabel(f"k: steps after the last seen {seen}")
        ax.set_title(label, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}: prediction error against the horizon, {error['chunks']} chunks of "
                 f"{source}", fontsize=10)
    fig.tight_layout()
    out = out.with_name(out.stem + "-error" + out.suffix)
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


def write_video(dreamer, wm, episode, ret, length, out, scale=2):
    """One episode as a GIF (Pillow, which matplotlib installs): real | model | |real − model|
    per agent step, the model's frames predicted open loop (dreamer.open_loop) in 50-step chunks
    after 5 seen images each; a header gives the step, seen or k steps open loop, and the real
    and predicted rewards. Rows after the last whole chunk are left out."""
    import torch
    from PIL import Image, ImageDraw
    torch.manual_seed(0)
    if np.ndim(episode["obs"]) == 2:                        # state vectors (--obs state)
        return write_state_video(dreamer, wm, episode, ret, length, out, scale)
    rows = min(len(episode["reward"]), length or len(episode["reward"]))
    frames = []
    for start in range(0, rows - 50 + 1, 50):
        r = dreamer.open_loop(wm, episode, start=start, length=50, context=5)
        diff = np.abs(r["obs"].astype(int) - r["model"].astype(int)).astype(np.uint8)
        for t in range(50):
            panels = [images[t].transpose(1, 2, 0) for images in (r["obs"], r["model"], diff)]
            gap = np.full((64, 4, 3), 255, np.uint8)
            strip = np.concatenate([panels[0], gap, panels[1], gap, panels[2]], 1)
            image = Image.fromarray(strip).resize((strip.shape[1] * scale, 64 * scale),
                                                  Image.NEAREST)
            frame = Image.new("RGB", (image.width, image.height + 28), "white")
            frame.paste(image, (0, 28))
            what = "seen" if t < r["context"] else f"open loop k={t - r['context'] + 1}"
            text = ImageDraw.Draw(frame)
            text.text((4, 2), f"step {start + t:3d}  {what}", fill="black")
            text.text((4, 15), f"reward {r['reward'][t]:.2f}  model {r['reward_pred'][t]:.2f}   "
                               f"real | model | error", fill="black")
            frames.append(frame)
    if not frames:
        raise SystemExit(f"plot.py: error: a video needs at least 50 agent steps, got {rows}")
    save_gif(frames, out)
    print(f"wrote {out}: {len(frames)} frames of an episode whose whole return is {ret:.1f}")


def write_state_video(dreamer, wm, episode, ret, length, out, scale=2):
    """A state run's episode as a GIF: the frame a person sees (the agent saw only the state
    vector) beside the state curves, real and predicted open loop in 50-step chunks after 5 seen
    states each (as write_video), with a cursor at the current step."""
    import torch
    from PIL import Image
    if "frames" not in episode:
        raise SystemExit("plot.py: error: a replay episode of a state run holds no frames to "
                         "show; drop --episode to play a new episode")
    torch.manual_seed(0)
    rows = min(len(episode["reward"]), length or len(episode["reward"]))
    chunks = [dreamer.open_loop(wm, episode, start=s, length=50, context=5)
              for s in range(0, rows - 50 + 1, 50)]
    if not chunks:
        raise SystemExit(f"plot.py: error: a video needs at least 50 agent steps, got {rows}")
    real = np.concatenate([c["obs"] for c in chunks])                  # [T, O]
    model = np.concatenate([c["model"] for c in chunks])
    dims = min(real.shape[1], 6)
    height = 64 * scale
    fig, axes = plt.subplots(dims, 1, figsize=(4.5, height * 1.6 / 100), dpi=100, sharex=True,
                             squeeze=False)
    cursors = []
    for i, ax in enumerate(axes[:, 0]):
        ax.plot(real[:, i], color="black", lw=1)
        ax.plot(model[:, i], color="crimson", lw=1)
        ax.set_ylabel(f"[{i}]", fontsize=6)
        ax.tick_params(labelsize=5)
        cursors.append(ax.axvline(0, color="grey", lw=0.8))
    axes[0, 0].set_title("state: real (black), open loop (red)", fontsize=7)
    fig.tight_layout(pad=0.3)
    frames = []
    for t in range(len(real)):
        for cursor in cursors:
            cursor.set_xdata([t, t])
        fig.canvas.draw()
        chart = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
        image = Image.fromarray(episode["frames"][t].transpose(1, 2, 0)).resize(
            (64 * scale, 64 * scale), Image.NEAREST)
        chart = chart.resize((int(chart.width * image.height * 1.6 / chart.height),
                              int(image.height * 1.6)))
        frame = Image.new("RGB", (image.width + 4 + chart.width, chart.height), "white")
        frame.paste(image, (0, (chart.height - image.height) // 2))
        frame.paste(chart, (image.width + 4, 0))
        frames.append(frame)
    plt.close(fig)
    save_gif(frames, out)
    print(f"wrote {out}: {len(frames)} frames of an episode whose whole return is {ret:.1f}")


def save_gif(frames, out):
    """PIL images → an animated GIF at 20 frames a second, looping."""
    from PIL import Image
    # One palette for all frames, from a sample of them, keeps the file small (a few MB for a
    # whole 500-step episode) and the colours steady.
    sample = frames[::max(1, len(frames) // 8)]
    montage = Image.new("RGB", (frames[0].width, frames[0].height * len(sample)))
    for i, frame in enumerate(sample):
        montage.paste(frame, (0, i * frame.height))
    palette = montage.quantize(colors=256, dither=0)                   # 0: no dithering
    frames = [frame.quantize(palette=palette, dither=0) for frame in frames]
    frames[0].save(out, save_all=True, append_images=frames[1:], duration=50, loop=0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="logdirs holding metrics.jsonl")
    p.add_argument("--metric", default="eval/return", help="metric to plot (default eval/return)")
    p.add_argument("--out", default=None, help="PNG path (default: RUN/curves.png for one run, "
                                                "curves.png for several)")
    p.add_argument("--openloop", action="store_true",
                   help="draw the first run's open-loop predictions and their error instead")
    p.add_argument("--video", action="store_true",
                   help="write the first run's policy at work beside its world model as a GIF")
    p.add_argument("--episode", type=int, default=None,
                   help="with --openloop/--video: show the run's replay file number I (-1: the "
                        "latest) instead of a new episode of its policy")
    p.add_argument("--episodes", type=int, default=1,
                   help="with --openloop/--video: how many new episodes to play (default 1)")
    p.add_argument("--start", type=int, default=0,
                   help="with --openloop: first agent step of the 50-step chunk (default 0)")
    p.add_argument("--length", type=int, default=None,
                   help="with --video: only the first N agent steps (default: all)")
    args = p.parse_args(argv)
    if args.openloop or args.video:
        return world_model_pictures(args)
    for flag, given in (("--episode", args.episode is not None), ("--episodes", args.episodes != 1),
                        ("--start", args.start != 0), ("--length", args.length is not None)):
        if given:
            raise SystemExit(f"plot.py: error: {flag} needs --openloop or --video")
    if len(args.runs) == 1 and is_ablation(Path(args.runs[0])):
        return draw_ablation(Path(args.runs[0]), args.metric, args.out)
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
            shared, m, s = mean_std_at_shared_steps(curves)
            if shared:
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


def mean_std_at_shared_steps(curves):
    """[(steps, values), …] → (the steps all curves have, mean and std over curves there)."""
    shared = sorted(set.intersection(*(set(x.tolist()) for x, _ in curves)))
    ys = np.array([[dict(zip(x.tolist(), y))[s] for s in shared] for x, y in curves])
    return shared, ys.mean(0), ys.std(0)


def is_ablation(root):
    """An ablation's folder (dreamer.py --ablation): no metrics.jsonl of its own, runs below."""
    return (not (root / "metrics.jsonl").exists()
            and any(p.is_dir() and (p / "metrics.jsonl").exists() for p in root.glob("*-s*")))


def draw_ablation(root, metric, out):
    """The arms of one ablation in one figure: per arm (its runs ROOT/ARM-sSEED), each seed a
    thin line and the mean ± std over the seeds at the steps they share a thick line and band."""
    arms = {}
    for run in sorted(p for p in root.glob("*-s*") if (p / "metrics.jsonl").exists()):
        arm, _, seed = run.name.rpartition("-s")
        task, series = load_run(run)
        if metric in series and seed.isdigit():
            arms.setdefault(arm, []).append((int(seed), *series[metric]))
    if not arms:
        raise SystemExit(f"plot.py: error: no run in {root} has {metric!r} yet")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (arm, runs) in enumerate(arms.items()):
        color = f"C{i}"
        for seed, x, y in runs:
            ax.plot(x, y, color=color, lw=0.8, alpha=0.35)
        shared, m, sd = mean_std_at_shared_steps([(x, y) for _, x, y in runs])
        seeds = ", ".join(str(seed) for seed, _, _ in runs)
        if not shared:
            continue
        ax.plot(shared, m, color=color, lw=2.2, marker=".",
                label=f"{arm}: mean ± std of {len(runs)} seed{'s' * (len(runs) > 1)} ({seeds})")
        ax.fill_between(shared, m - sd, m + sd, color=color, alpha=0.15)
        print(f"{arm}: {metric} {m[-1]:.1f} ± {sd[-1]:.1f} at {shared[-1]:,} env steps "
              f"(seeds {seeds})")
    ax.set_xlabel("env steps (after action repeat)")
    ax.set_ylabel(metric)
    ax.set_title(f"{root.name}" + (f" ({task})" if task else ""))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    out = Path(out) if out else root / "curves.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def world_model_pictures(args):
    """--openloop and --video: the pictures that need the run's checkpoint."""
    if args.openloop and args.video:
        raise SystemExit("plot.py: error: --openloop and --video are separate commands")
    for name in ("start", "episodes", "length"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "start" else 1):
            raise SystemExit(f"plot.py: error: --{name} must be ≥ {int(name != 'start')}, "
                             f"got {value}")
    unused = [flag for flag, given in (("--start", args.video and args.start),
                                       ("--length", args.openloop and args.length),
                                       ("--episodes", args.episode is not None
                                        and args.episodes != 1)) if given]
    if unused:
        raise SystemExit(f"plot.py: error: {unused[0]} does nothing here (see --help)")
    run = Path(args.runs[0])
    dreamer, cfg, agent, episodes, source = load_episodes(run, args.episode, args.episodes,
                                                          video=args.video)
    wm = agent.world_model.eval()
    try:
        if args.openloop:
            out = Path(args.out) if args.out else run / "openloop.png"
            return draw_open_loop(dreamer, wm, cfg, episodes, source, args.start, run.name, out)
        for i, (episode, ret) in enumerate(episodes):
            out = Path(args.out) if args.out else run / "video.gif"
            if len(episodes) > 1:
                out = out.with_name(f"{out.stem}-{i + 1}{out.suffix}")
            write_video(dreamer, wm, episode, ret, args.length, out)
    except (OSError, ValueError) as e:   # a folder that is not there, an unknown file type
        raise SystemExit(f"plot.py: error: cannot write {out} ({e})") from None


if __name__ == "__main__":
    main()
