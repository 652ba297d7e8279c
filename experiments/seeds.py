"""
Seeds: the quality benchmark's key rows (bench.py --quality) trained over several seeds, so that every difference
comes with the spread across training seeds beside the error over the evaluation text, and is worded by what
survives both.

    python experiments/seeds.py                          # block 64 (the CPU default), 3 seeds: ~25 minutes on 2 cores
    python experiments/seeds.py --setting="block 256"    # block 256, 3 seeds (without the deeper model): ~30 minutes
    python experiments/seeds.py --rows=mod_4_3           # some rows only (names in ROWS; dense is always trained)

Rows: dense; the shallow control (dense without MoD's routed blocks); MoD; the paper's random control (top-k on
Gaussian noise, the noise also the weight); the random control with weight 1 (random selection, no noisy weight);
at block 64, the nearest-FLOP MoD (the depth whose FLOPs are nearest dense's: 7 layers, 1.12x dense's FLOPs
- deeper, not isoFLOP); and, only when asked with --rows, MoD trained 4/3 as many iterations (about dense's training
time: MoD's step took 0.75x dense's in bench.py --quality's run) or MoD with its predictors' gradients clipped
together with the trunk's, under one norm (how train.py clipped before train.clip_groups), or MoD with
router_weight=sigmoid. Every model is scored on the same
validation windows, so a seed's difference between two models is paired, window by window. Writes
bench_runs/seeds/<setting>.md and .json.
"""

import contextlib
import dataclasses
import os

import common

ROWS = {  # name (for --rows and the run folders): (label, settings on top of the shape); shallow's and deeper's
    # depth are filled in by run()
    "dense": ("dense", dict(mod_every=0)),
    "shallow": ("shallow control", dict(mod_every=0)),
    "mod": ("MoD", dict()),
    "random": ("random control (noise is the weight)", dict(router="random")),
    "random_w1": ("random control, weight 1", dict(router="random", router_weight="one")),
    "deeper": ("nearest-FLOP MoD (deeper)", dict()),
    "mod_4_3": ("MoD, 4/3 the iterations", dict(iterations=4 / 3)),
    "mod_clip_together": ("MoD, predictor clipped with the trunk", dict(clip_together=True)),
    "sigmoid": ("MoD, router_weight=sigmoid", dict(router_weight="sigmoid")),
}
DEFAULT_ROWS = "dense,shallow,mod,random,random_w1,deeper"
# the differences the results page states: (a, b, what a - b means); losses are top-k unless "causal" is named
COMPARISONS = [
    ("MoD", "dense", "MoD - dense"),
    ("MoD, 4/3 the iterations causal", "dense", "MoD with 4/3 the iterations, causal - dense"),
    ("MoD causal", "dense", "MoD under causal routing - dense"),
    ("shallow control", "dense", "shallow - dense: what the dense blocks MoD routes are worth"),
    ("shallow control", "MoD", "shallow - MoD: what MoD's routed blocks are worth"),
    ("shallow control", "MoD causal", "shallow - MoD causal: the same under causal routing"),
    ("random control (noise is the weight)", "MoD", "random - MoD: learned routing against random"),
    ("random control, weight 1", "MoD", "random weight 1 - MoD"),
    ("random control (noise is the weight)", "random control, weight 1", "random - random weight 1: the noisy weight"),
    ("random control (noise is the weight)", "shallow control", "random - shallow: do randomly routed blocks help?"),
    ("random control, weight 1", "shallow control", "random weight 1 - shallow"),
    ("MoD causal", "MoD", "MoD's causal gap (causal - top-k)"),
    ("MoD, predictor clipped with the trunk", "MoD", "clipped together - apart, top-k"),
    ("MoD, predictor clipped with the trunk causal", "MoD causal", "clipped together - apart, causal"),
    ("MoD, predictor clipped with the trunk causal", "MoD, predictor clipped with the trunk",
     "clipped together: causal gap"),
    ("MoD, router_weight=sigmoid", "MoD", "sigmoid - raw, top-k"),
    ("MoD, router_weight=sigmoid causal", "MoD causal", "sigmoid - raw, causal"),
    ("MoD, router_weight=sigmoid causal", "MoD, router_weight=sigmoid", "sigmoid: causal gap"),
    ("nearest-FLOP MoD (deeper) causal", "dense", "nearest-FLOP causal - dense"),
    ("nearest-FLOP MoD (deeper)", "dense", "nearest-FLOP top-k - dense"),
    ("nearest-FLOP MoD (deeper) causal", "nearest-FLOP MoD (deeper)", "nearest-FLOP's causal gap"),
]


def run(setting="block 64", seeds=3, max_iters=2000, eval_iters=200, out_dir="bench_runs/seeds", data_dir="",
        rows=DEFAULT_ROWS, deeper=None, **overrides):
    """Train the rows (comma-separated names of ROWS; dense always) for each seed (1337, 1338, ...), measure them
    on shared windows, write the tables. deeper: whether to train the nearest-FLOP MoD (default: at block 64 only).
    overrides: fields of MoDConfig (the shape) or of train.TrainConfig, for tests."""
    model_fields = {f.name for f in dataclasses.fields(common.MoDConfig)}
    shape = dict(common.SETTINGS[setting], **{k: v for k, v in overrides.items() if k in model_fields})
    extra = {k: v for k, v in overrides.items() if k not in model_fields}
    batch_size = shape.pop("batch_size")
    data_dir = common.data_folder(data_dir)
    T = shape["block_size"]
    windows = common.bench.val_windows(data_dir, T, max(20, eval_iters * common.bench.EVAL_TOKENS // T))
    dense_flops = common.flops(shape, mod_every=0)
    n_dense = sum(not common.MoDConfig(**shape).is_routed(i) for i in range(shape["n_layer"]))
    deep = min(range(shape["n_layer"] + 1, 3 * shape["n_layer"]),
               key=lambda n: abs(common.flops(shape, n_layer=n) - dense_flops))
    names = ["dense"] + [name.strip() for name in rows.split(",") if name.strip() != "dense"]
    unknown = [name for name in names if name not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: no row {', '.join(unknown)}; the rows are {', '.join(ROWS)}")
    if "deeper" in names and not (setting == "block 64" if deeper is None else deeper):
        names.remove("deeper")
    depth = dict(shallow=n_dense, deeper=deep)  # the rows whose depth differs from the shape's
    rows = {name: (ROWS[name][0], dict(ROWS[name][1], **({"n_layer": depth[name]} if name in depth else {})))
            for name in names}
    log_dir = os.path.join(out_dir, setting.replace(" ", ""))
    results = {}  # (label, seed) -> measure()
    for seed in range(1337, 1337 + seeds):
        for name, (label, fields) in rows.items():
            fields = dict(fields)
            iters = round(max_iters * fields.pop("iterations", 1))
            together = fields.pop("clip_together", False)
            settings = common.train_settings(shape, batch_size, iters, max(1, eval_iters // 10),
                                             data_dir=data_dir, seed=seed, **fields, **extra)
            with clipped_together(together):
                results[label, seed] = common.measure(f"{name}_{seed}", log_dir, windows, settings)
    labelled = {label: {k: v for k, v in fields.items() if k not in ("iterations", "clip_together")}
                for label, fields in rows.values()}
    lines, data = tables(results, labelled, shape, dense_flops, setting, seeds, max_iters, batch_size, len(windows))
    file = setting.replace(" ", "") + ("" if rows.keys() == set(DEFAULT_ROWS.split(",")) else "_" + "_".join(rows))
    common.write(out_dir, file, lines, data)
    return data


@contextlib.contextmanager
def clipped_together(on):
    """With on: train.py clips one gradient norm over all parameters, trunk and predictors together (the coupling
    train.clip_groups removed), for the row that measures what that change did; otherwise nothing changes."""
    original = common.train.clip_groups
    if on:
        common.train.clip_groups = lambda model: [list(model.parameters())]
    try:
        yield
    finally:
        common.train.clip_groups = original


def losses(results, name, seed):
    """The (N, T) losses of row `name` ("<label>" for top-k, "<label> causal" for causal routing) at one seed."""
    causal = name.endswith(" causal")
    run = results.get((name[:-len(" causal")] if causal else name, seed))
    return None if run is None else run["causal" if causal else "topk"]


def tables(results, rows, shape, dense_flops, setting, seeds, iters, batch_size, n_windows):
    seed_list = list(range(1337, 1337 + seeds))
    head = (f"### Seeds, {setting}: {shape['n_layer']} x {shape['n_embd']}, batch {batch_size}, {iters} iterations, "
            f"seeds {', '.join(map(str, seed_list))}; {n_windows:,} validation windows of {shape['block_size']} tokens")
    lines = [head, "", "| row | FLOPs vs dense | val loss, top-k, per seed | mean ± seed sd | val loss, causal, "
             "mean ± seed sd | predictor per routed block, causal inputs: accuracy / balanced accuracy / precision / "
             "recall "
             "(%, mean over seeds) | ms/iter |", "| --- | --- | --- | --- | --- | --- | --- |"]
    data = dict(setting=setting, seeds=seed_list, rows={}, comparisons={})
    for label, fields in rows.items():
        runs = [results[label, s] for s in seed_list]
        topk = [r["topk"].mean().item() for r in runs]
        mean, sd, _ = common.over_seeds(topk)
        entry = dict(flops=common.flops(shape, **fields) / dense_flops, topk=topk, iters=runs[0]["iters"],
                     ms_per_iter=[r["ms_per_iter"] for r in runs])
        causal = scores = ""
        if "causal" in runs[0]:
            entry["causal"] = [r["causal"].mean().item() for r in runs]
            entry["scores"] = [r["scores"] for r in runs]
            c_mean, c_sd, _ = common.over_seeds(entry["causal"])
            causal = f"{c_mean:.4f} ± {c_sd:.4f}"
            blocks = len(runs[0]["scores"])
            scores = " ; ".join("/".join(f"{100 * sum(r['scores'][j][k] for r in runs) / len(runs):.1f}"
                                         for k in ("accuracy", "balanced", "precision", "recall"))
                                for j in range(blocks))
        data["rows"][label] = entry
        shown = label if entry["iters"] == iters else f"{label} ({entry['iters']} iterations)"
        lines.append(f"| {shown} | {entry['flops']:.2f}x | {' / '.join(f'{v:.4f}' for v in topk)} | "
                     f"{mean:.4f} ± {sd:.4f} | {causal} | {scores} | "
                     f"{sum(entry['ms_per_iter']) / len(runs):.1f} |")
    lines += ["", "| difference (nats) | per seed (± evaluation-text error) | mean ± seed sd | verdict |",
              "| --- | --- | --- | --- |"]
    for a, b, meaning in COMPARISONS:
        if losses(results, a, seed_list[0]) is None or losses(results, b, seed_list[0]) is None:
            continue
        per_seed = [common.paired(losses(results, a, s), losses(results, b, s)) for s in seed_list]
        mean, sd, verdict = common.over_seeds([d for d, _ in per_seed])
        data["comparisons"][meaning] = dict(per_seed=per_seed, mean=mean, sd=sd, verdict=verdict)
        lines.append(f"| {meaning} | {' / '.join(f'{d:+.4f} ± {se:.4f}' for d, se in per_seed)} | "
                     f"{mean:+.4f} ± {sd:.4f} | {verdict} |")
    # the last-position anomaly (docs/results.md): last position minus the middle, minus dense's, per seed
    lines += ["", f"| last-position excess over dense (position {shape['block_size'] - 1} minus "
              f"{shape['block_size'] // 2}-{shape['block_size'] - 3}) | per seed | mean ± seed sd | verdict |",
              "| --- | --- | --- | --- |"]
    for label in rows:
        if label == "dense":
            continue
        per_seed = [common.bench.mean_se(common.bench.last_vs_middle(results[label, s]["topk"])
                                         - common.bench.last_vs_middle(results["dense", s]["topk"]))
                    for s in seed_list]
        mean, sd, verdict = common.over_seeds([d for d, _ in per_seed])
        data["rows"][label]["last_position_excess"] = per_seed
        lines.append(f"| {label} | {' / '.join(f'{d:+.4f} ± {se:.4f}' for d, se in per_seed)} | "
                     f"{mean:+.4f} ± {sd:.4f} | {verdict} |")
    lines += ["", "A difference *holds* when the 95% t-interval of its mean across seeds excludes 0 (with 3 seeds: the "
              "mean is over 4.3 x sd / sqrt(3)); the ± per seed is the standard error over the evaluation text only."]
    return lines, data


if __name__ == "__main__":
    run(**common.command_line(__doc__, setting="block 64", seeds=3, max_iters=2000, eval_iters=200,
                              out_dir="bench_runs/seeds", data_dir="", rows=DEFAULT_ROWS))
