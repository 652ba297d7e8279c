"""
The MoDE experiment of docs/mode.md, in one command: dense, MoE, MoD, staged MoDE, integrated MoDE and the control
(the same experts at the same reduced capacity without the no-op slot), each trained with train.main at one CPU
scale, with its validation loss (top-k and causal), FLOPs per forward, parameters and ms/iter, and a plot of loss
against FLOPs per forward (the paper's Fig. 7, at toy scale). Integrated MoDE and its control train over several
seeds (the pair the paper compares); the others over one.

    python experiments/mode_experiment.py                  # docs/mode.md's run (4 x 128, block 256, 800 iterations)
    python experiments/mode_experiment.py --max_iters=100  # shorter; --help lists every setting

It writes bench_runs/mode/: each run's folder (train.py's log and checkpoints), results.json, mode_loss_flops.png.
"""

import argparse
import contextlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from anywhere: train.py, mod.py and mode.py live one folder up

import train  # noqa: E402
from data.prepare import dataset_dir  # noqa: E402
from mod import MoDConfig, MoDGPT  # noqa: E402

# name: the model's settings (mod.MoDConfig's fields) on top of the shape. Experts sit in blocks 1 and 3 (mod_every=2).
MODELS = {
    "dense": dict(mod_every=0),
    "MoE": dict(n_experts=4, expert_capacity=0.25),  # 4 experts x 1/4 of the tokens: a dense MLP's FLOPs
    "MoD": dict(capacity=0.125),
    "staged MoDE": dict(capacity=0.125, n_experts=4, expert_capacity=0.25, mode="staged"),
    "integrated MoDE": dict(n_experts=4, expert_capacity=0.125, mode="integrated"),  # half a dense MLP's FLOPs
    "control": dict(n_experts=4, expert_capacity=0.125),  # the same experts and capacity, no no-op slot
}
PAIR = ("integrated MoDE", "control")  # trained over `seeds` seeds


def run(out_dir="bench_runs/mode", max_iters=800, seeds=2, n_layer=4, n_head=4, n_embd=128, block_size=256,
        batch_size=8, eval_iters=40, data_dir="", plot=True, **extra):
    """Train every model of MODELS (the PAIR over `seeds` seeds); return one row per run (a dict), also saved as
    out_dir/results.json; draw out_dir/mode_loss_flops.png if plot."""
    shape = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size)
    rows = []
    for name, fields in MODELS.items():
        for seed in range(1337, 1337 + (seeds if name in PAIR else 1)):
            folder = os.path.join(out_dir, f"{name.replace(' ', '_')}_{seed}")
            os.makedirs(folder, exist_ok=True)
            settings = dict(shape, **fields, seed=seed, out_dir=folder, overwrite=True, device="cpu", data_dir=data_dir,
                            batch_size=batch_size, max_iters=max_iters, lr_decay_iters=max_iters, dropout=0.0,
                            eval_interval=max_iters, eval_iters=eval_iters, log_interval=max(1, max_iters // 4),
                            sample_tokens=0, **extra)
            with open(os.path.join(folder, "train.log"), "w") as log, contextlib.redirect_stdout(log):
                result = train.main(**settings)
            with open(os.path.join(data_dir or dataset_dir("shakespeare_char"), "meta.json")) as f:
                vocab_size = json.load(f)["vocab_size"]
            model = MoDGPT(MoDConfig(**shape, **fields, vocab_size=vocab_size))
            ev = result["eval"]
            rows.append(dict(model=name, seed=seed, val_topk=ev["val_topk"], val_causal=ev.get("val_predictor"),
                             flops=model.estimate_flops(block_size)["total"], params=model.get_num_params(),
                             ms_per_iter=result["ms_per_iter"], wall_s=result["wall_s"]))
            print(format_row(rows[-1], rows[0]["flops"]), flush=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(summary(rows))
    if plot:
        draw(rows, os.path.join(out_dir, "mode_loss_flops.png"), max_iters, shape, batch_size)
    return rows


def format_row(r, dense_flops):
    causal = "-" if r["val_causal"] is None else f"{r['val_causal']:.4f}"
    return (f"| {r['model']} | {r['seed']} | {r['val_topk']:.4f} | {causal} | {r['flops'] / 1e6:.1f} "
            f"({r['flops'] / dense_flops:.2f}x) | {r['params'] / 1e6:.3f} | {r['ms_per_iter']:.0f} |")


HEADER = ("| model | seed | val loss, top-k | val loss, causal | MFLOPs per forward (vs dense) | parameters (M) "
          "| ms/iter |\n| --- | --- | --- | --- | --- | --- | --- |")


def summary(rows):
    """The table, then the pair's per-seed differences (integrated minus control, causal and top-k)."""
    lines = [HEADER] + [format_row(r, rows[0]["flops"]) for r in rows]
    a, b = ([r for r in rows if r["model"] == name] for name in PAIR)
    for x, y in zip(a, b):
        lines.append(f"seed {x['seed']}: {PAIR[0]} - {PAIR[1]} = {x['val_causal'] - y['val_causal']:+.4f} causal, "
                     f"{x['val_topk'] - y['val_topk']:+.4f} top-k")
    return "\n".join(lines)


def draw(rows, path, max_iters, shape, batch_size):
    """Causal validation loss (filled; top-k hollow) against FLOPs per forward, one colour per model."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(MODELS):
        mine = [r for r in rows if r["model"] == name]
        colour = f"C{i}"
        ax.scatter([r["flops"] / 1e6 for r in mine], [r["val_causal"] or r["val_topk"] for r in mine], color=colour,
                   label=name + (f" ({len(mine)} seeds)" if len(mine) > 1 else ""))
        ax.scatter([r["flops"] / 1e6 for r in mine], [r["val_topk"] for r in mine], facecolors="none",
                   edgecolors=colour)
    ax.set_xlabel("MFLOPs per forward pass (one sequence)")
    ax.set_ylabel("validation loss (filled: causal; hollow: top-k)")
    ax.set_title(f"MoDE at CPU scale: {shape['n_layer']} x {shape['n_embd']}, block {shape['block_size']}, batch "
                 f"{batch_size}, {max_iters} iterations\npython experiments/mode_experiment.py", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for key, default in dict(out_dir="bench_runs/mode", max_iters=800, seeds=2, n_layer=4, n_head=4, n_embd=128,
                             block_size=256, batch_size=8, eval_iters=40, data_dir="").items():
        parser.add_argument(f"--{key}", type=type(default), default=default)
    run(**vars(parser.parse_args()))
