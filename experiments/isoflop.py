"""
isoFLOP in miniature (the paper's central figure, Fig. 3): at each training-FLOP budget, dense and MoD models of
several sizes, each trained for as many iterations as the budget buys; validation loss against parameters per
budget; whether the best MoD beats the best dense, and how much faster it steps (the two timed side by side).

    python experiments/isoflop.py        # 2 budgets x 4 sizes x {dense, MoD}: ~15 minutes on 2 cores
    python experiments/isoflop.py --budgets=1000,3000 --sizes=2x96,4x128,6x160,8x192   # larger: ~25 minutes

A budget is given in iterations of the CPU default's dense model (4 x 128, block 64, batch 12): 1000 means the
training FLOPs of 1000 of its steps (3 x forward FLOPs per sequence x batch x iterations, mod.estimate_flops). MoD
routes 12.5% of the tokens every other block, so a MoD model takes more steps than a dense one of its size on the
same budget. Every size trains with the CPU default's settings (learning rate 1e-3, warm-up 100, cosine decay over
its own run) and one seed; the losses are measured on the same validation windows. Writes bench_runs/isoflop/:
isoflop.md, isoflop.json, isoflop.png.
"""

import os

import torch

import common

REFERENCE = dict(n_layer=4, n_head=4, n_embd=128)  # the CPU default: the unit of the budgets


def parse_sizes(text):
    """"2x96,4x128" -> [(2, 96), (4, 128)] (layers x width; 4 heads each)."""
    return [tuple(int(v) for v in size.split("x")) for size in text.split(",")]


def run(budgets="300,1000", sizes="2x48,2x64,2x96,4x128", block_size=64, batch_size=12, eval_iters=50, seed=1337,
        out_dir="bench_runs/isoflop", data_dir="", repeats=5, plot=True, **extra):
    data_dir = common.data_folder(data_dir)
    n_windows = max(20, eval_iters * common.bench.EVAL_TOKENS // block_size)
    windows = common.bench.val_windows(data_dir, block_size, n_windows)
    unit = 3 * common.flops(dict(REFERENCE, block_size=block_size), mod_every=0) * batch_size  # one reference step
    runs = []
    for budget in (float(b) for b in budgets.split(",")):
        for family, mod_every in (("dense", 0), ("MoD", 2)):
            for n_layer, n_embd in parse_sizes(sizes):
                shape = dict(n_layer=n_layer, n_head=4, n_embd=n_embd, block_size=block_size)
                step_flops = 3 * common.flops(shape, mod_every=mod_every) * batch_size
                iters = max(1, round(budget * unit / step_flops))
                settings = common.train_settings(shape, batch_size, iters, max(1, eval_iters // 10),
                                                 data_dir=data_dir, seed=seed, mod_every=mod_every, **extra)
                m = common.measure(f"{budget:g}_{family}_{n_layer}x{n_embd}", out_dir, windows, settings)
                runs.append(dict(m, budget=budget, family=family, shape=shape, mod_every=mod_every,
                                 params=common.params(shape, mod_every=mod_every), flops=step_flops * iters))
    lines, data = tables(runs, windows, batch_size, repeats, extra)
    common.write(out_dir, "isoflop", lines, data)
    if plot:
        draw(data, os.path.join(out_dir, "isoflop.png"), block_size, batch_size)
    return data


def loss_of(run):
    """The loss that holds when sampling: causal for MoD, top-k (the only one) for dense."""
    return run.get("causal", run["topk"])


def tables(runs, windows, batch_size, repeats, extra):
    lines = [f"### isoFLOP: block {windows.size(1) - 1}, batch {batch_size}, one seed; {len(windows):,} validation "
             "windows", "", "| budget (reference steps) | model | parameters | iterations | val loss, top-k | "
             "val loss, causal | ms/iter (training) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    data = dict(runs=[], best={})
    for r in runs:
        causal = f"{r['causal'].mean():.4f}" if "causal" in r else ""
        lines.append(f"| {r['budget']:g} | {r['family']} {r['shape']['n_layer']} x {r['shape']['n_embd']} | "
                     f"{r['params'] / 1e6:.3f}M | {r['iters']} | {r['topk'].mean():.4f} | {causal} | "
                     f"{r['ms_per_iter']:.1f} |")
        data["runs"].append(dict(budget=r["budget"], family=r["family"], shape=r["shape"], params=r["params"],
                                 iters=r["iters"], flops=r["flops"], topk=r["topk"].mean().item(),
                                 causal=r["causal"].mean().item() if "causal" in r else None,
                                 ms_per_iter=r["ms_per_iter"]))
    lines += ["", "| budget | best dense | best MoD (causal) | MoD - dense (paired) | best MoD's step time over best "
              "dense's, side by side | MoD's FLOPs per forward over dense's |", "| --- | --- | --- | --- | --- | --- |"]
    for budget in sorted({r["budget"] for r in runs}):
        best = {family: min((r for r in runs if r["budget"] == budget and r["family"] == family),
                            key=lambda r: loss_of(r).mean().item()) for family in ("dense", "MoD")}
        diff, se = common.paired(loss_of(best["MoD"]), loss_of(best["dense"]))
        ms = step_times([best["dense"], best["MoD"]], batch_size, repeats, extra)
        fwd = [common.flops(b["shape"], mod_every=b["mod_every"]) for b in (best["dense"], best["MoD"])]
        data["best"][budget] = dict(dense=best["dense"]["label"], mod=best["MoD"]["label"], diff=diff, se=se,
                                    step_ms=ms, forward_flops_ratio=fwd[1] / fwd[0])
        lines.append(f"| {budget:g} | {best['dense']['label']}: {loss_of(best['dense']).mean():.4f} | "
                     f"{best['MoD']['label']}: {loss_of(best['MoD']).mean():.4f} | {diff:+.4f} ± {se:.4f} | "
                     f"{ms[1]:.1f} / {ms[0]:.1f} ms = {ms[1] / ms[0]:.2f}x | {fwd[1] / fwd[0]:.2f}x |")
    lines += ["", "One training seed per model: a difference is one draw (the seeds experiment shows how far a seed "
              "moves a loss); ± is the standard error over the evaluation text only. The step times are medians of "
              f"{repeats} interleaved rounds of both models' training steps (forward, backward, AdamW), untrained "
              "weights, in one process."]
    return lines, data


def step_times(runs, batch_size, repeats, extra):
    """Median ms per training step of each run's model shape, the models taking turns (bench.median_times)."""
    models = [common.bench.build(r["shape"], r["mod_every"], "cpu") for r in runs]
    T = runs[0]["shape"]["block_size"]
    x = torch.randint(0, common.bench.VOCAB, (batch_size, T), generator=torch.Generator().manual_seed(0))
    steps = common.bench.train_steps(models, x, torch.roll(x, -1, 1), "cpu", torch.autocast("cpu", enabled=False),
                                     compiled=False)
    return [1000 * t for t in common.bench.median_times(steps, repeats)]


def draw(data, path, block_size, batch_size):
    plt = common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, budget in enumerate(sorted({r["budget"] for r in data["runs"]})):
        for family, style in (("dense", "o-"), ("MoD", "s--")):
            mine = sorted((r for r in data["runs"] if r["budget"] == budget and r["family"] == family),
                          key=lambda r: r["params"])
            x = [r["params"] / 1e6 for r in mine]
            ax.plot(x, [r["causal"] if r["causal"] is not None else r["topk"] for r in mine], style, color=f"C{i}",
                    label=f"{family}, budget {budget:g} reference steps" + (" (causal)" if family == "MoD" else ""))
            if family == "MoD":
                ax.scatter(x, [r["topk"] for r in mine], facecolors="none", edgecolors=f"C{i}", marker="s")
    ax.set_xscale("log")
    sizes = sorted({r["params"] / 1e6 for r in data["runs"] if r["family"] == "dense"})
    ax.set_xticks(sizes, [f"{p:.2g}M" for p in sizes])
    ax.minorticks_off()
    ax.set_xlabel("parameters (log scale; MoD's are ~2% more: routers and predictors)")
    ax.set_ylabel("validation loss (MoD: causal; hollow: top-k)")
    ax.set_title(f"isoFLOP in miniature: block {block_size}, batch {batch_size}, one seed\n"
                 "python experiments/isoflop.py", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    run(**common.command_line(__doc__, budgets="300,1000", sizes="2x48,2x64,2x96,4x128", block_size=64,
                              batch_size=12, eval_iters=50, seed=1337, out_dir="bench_runs/isoflop", data_dir="",
                              repeats=5))
