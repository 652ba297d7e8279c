"""
Capacity x frequency (the paper's sweep, section 4.1 and Fig. 3's left panel): MoD at 12.5%, 25% and 50% capacity,
routing every block or every other block, against dense, all at the same number of iterations, with a plot.

    python experiments/capacity_frequency.py    # block 256 (4 x 128, batch 8, 2000 iterations): ~20 minutes, 2 cores

"Every block" routes blocks 1, 2, 3 (mod_every=1): block 0 stays dense, as in every MoD model here. The paper found
12.5% every other block best, and routing every block "crucial" to avoid. One seed per model (the seeds experiment
measures how far a seed moves a loss at this setting); every model is scored on the same validation windows.
Writes bench_runs/capacity_frequency/: capacity_frequency.md, .json and .png.
"""

import os

import common

CAPACITIES = (0.125, 0.25, 0.5)
FREQUENCIES = {"every other block": 2, "every block": 1}  # name: mod_every


def run(setting="block 256", max_iters=2000, eval_iters=200, seed=1337, out_dir="bench_runs/capacity_frequency",
        data_dir="", plot=True, **overrides):
    shape = dict(common.SETTINGS[setting], **overrides)
    batch_size = shape.pop("batch_size")
    data_dir = common.data_folder(data_dir)
    T = shape["block_size"]
    windows = common.bench.val_windows(data_dir, T, max(20, eval_iters * common.bench.EVAL_TOKENS // T))
    models = {"dense": dict(mod_every=0)}
    for name, mod_every in FREQUENCIES.items():
        for capacity in CAPACITIES:
            models[f"{capacity:.1%}, {name}"] = dict(mod_every=mod_every, capacity=capacity)
    dense_flops = common.flops(shape, mod_every=0)
    runs = {}
    for label, fields in models.items():
        settings = common.train_settings(shape, batch_size, max_iters, max(1, eval_iters // 10), data_dir=data_dir,
                                         seed=seed, **fields)
        runs[label] = common.measure(label.replace("%, ", "_").replace(" ", "_"), out_dir, windows, settings)
    lines = [f"### Capacity x frequency, {setting}: {shape['n_layer']} x {shape['n_embd']}, batch {batch_size}, "
             f"{max_iters} iterations, seed {seed}; {len(windows):,} validation windows of {T} tokens", "",
             "| model | FLOPs per forward vs dense | val loss, top-k | val loss, causal | causal - dense (paired) | "
             "predictor per routed block: balanced accuracy (%) | ms/iter |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    data = dict(setting=setting, seed=seed, models={})
    for label, fields in models.items():
        r = runs[label]
        loss = r.get("causal", r["topk"])
        diff, se = common.paired(loss, runs["dense"]["topk"])
        ratio = common.flops(shape, **fields) / dense_flops
        data["models"][label] = dict(fields, flops=ratio, topk=r["topk"].mean().item(), diff=diff, se=se,
                                     causal=r["causal"].mean().item() if "causal" in r else None,
                                     scores=r.get("scores"), ms_per_iter=r["ms_per_iter"])
        balanced = " / ".join(f"{100 * s['balanced']:.1f}" for s in r.get("scores", []))
        causal = f"{r['causal'].mean():.4f}" if "causal" in r else ""
        versus = "" if label == "dense" else f"{diff:+.4f} ± {se:.4f}"
        lines.append(f"| {label} | {ratio:.2f}x | {r['topk'].mean():.4f} | {causal} | {versus} | {balanced} | "
                     f"{r['ms_per_iter']:.1f} |")
    lines += ["", "One seed per model; ± is the standard error over the evaluation text only, not over seeds."]
    common.write(out_dir, "capacity_frequency", lines, data)
    if plot:
        draw(data, os.path.join(out_dir, "capacity_frequency.png"), shape, batch_size, max_iters)
    return data


def draw(data, path, shape, batch_size, max_iters):
    plt = common.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    dense = data["models"]["dense"]
    for i, (name, mod_every) in enumerate(FREQUENCIES.items()):
        mine = [m for m in data["models"].values() if m.get("capacity") and m["mod_every"] == mod_every]
        for ax, x in zip(axes, ([100 * m["capacity"] for m in mine], [m["flops"] for m in mine])):
            ax.plot(x, [m["causal"] for m in mine], "o-", color=f"C{i}", label=f"MoD, {name} (causal)")
            ax.scatter(x, [m["topk"] for m in mine], facecolors="none", edgecolors=f"C{i}")
    for ax in axes:
        ax.axhline(dense["topk"], color="k", linestyle=":", label="dense")
        ax.set_ylabel("validation loss (filled: causal; hollow: top-k)")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks([100 * c for c in CAPACITIES], [f"{100 * c:g}%" for c in CAPACITIES])
    axes[0].set_xlabel("capacity (share of tokens each routed block processes)")
    axes[1].set_xlabel("FLOPs per forward pass, relative to dense")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Capacity x frequency: {shape['n_layer']} x {shape['n_embd']}, block {shape['block_size']}, batch "
                 f"{batch_size}, {max_iters} iterations, one seed (python experiments/capacity_frequency.py)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    run(**common.command_line(__doc__, setting="block 256", max_iters=2000, eval_iters=200, seed=1337,
                              out_dir="bench_runs/capacity_frequency", data_dir=""))
