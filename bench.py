"""
Does Mixture-of-Depths pay off? Dense and MoD models of the same shape, measured side by side in one process.

    python bench.py                     # speed: a CPU-sized shape and nanoGPT's shakespeare_char shape
    python bench.py --quality           # and quality: six short trainings on shakespeare_char (minutes on a CPU)
    python bench.py --device=cuda --dtype=bfloat16 [--compile]   # the speed part on a GPU

Speed (dense vs MoD at 12.5% capacity on every other block): the two models take turns (A B A B ...) and each figure
is the median of several repeats, because shared machines are noisy. It reports the training step (forward, backward
and AdamW), generation tokens/s with the KV cache at batch 1 and 8, forward FLOPs measured by FlopCounterMode next
to the estimate, and KV-cache bytes. Every speed ratio is shown against its ideal, the FLOP ratio.
The models are untrained; so that generation routes what a trained predictor routes, each predictor's bias is set
so that it routes `capacity` of the tokens of a calibration batch.

Quality: six trainings on the same data with the same seed: (a) dense, (b) MoD of the same shape for as many
iterations and (b') for the same training time, (c) MoD with the dense model's FLOPs per forward pass (more layers:
the paper's isoFLOP comparison), (d) the random-routing control and (e) MoD with the other router_weight (sigmoid(r)
instead of raw r). It reports the validation loss under top-k and under causal predictor routing, the predictor's
accuracy, and time.

The output is markdown, printed and written to --out (default bench.md), with the command and the machine.

    python bench.py --figures           # only the README's pictures: figures/loss_curves.png, figures/routing_map.png

Figures: trains dense and MoD with train.py's defaults for the device (on a CPU nanoGPT's laptop setting, a few
minutes for both) into bench_runs/figures/, draws their validation loss against iterations and training time from
the runs' metrics.jsonl, and the routing map of a sample of the MoD model. A second call resumes both runs (a finished
run only evaluates once more) and draws again. The drawing functions below are the ones tutorial.ipynb uses; they
need matplotlib (pip install matplotlib), which training, sampling and the tests never do.
"""

import contextlib
import copy
import io
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import sample
import train
from mod import MoDBlock, MoDConfig, MoDGPT

SHAPES = {  # model shape and training batch size (the GPU batch of shakespeare_char is nanoGPT's)
    "cpu (nanoGPT laptop)": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_cpu=12, batch_gpu=12),
    "shakespeare_char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_cpu=8, batch_gpu=64),
}
VOCAB = 65
HERE = os.path.dirname(os.path.abspath(__file__))


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(shape, mod_every, device, seed=0):
    torch.manual_seed(seed)
    cfg = MoDConfig(vocab_size=VOCAB, mod_every=mod_every, dropout=0.0,
                    **{k: v for k, v in shape.items() if not k.startswith("batch")})
    return MoDGPT(cfg).to(device)


@torch.no_grad()
def calibrate_predictors(model, device, batch=8):
    """Set each predictor's bias so that, on random tokens, it routes `capacity` of them, block after block (a later
    block's input depends on what the earlier ones routed). A trained predictor routes about that much."""
    cfg = model.config
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=torch.Generator().manual_seed(0))
    idx = idx.to(device)
    for block in model.transformer.h:
        if isinstance(block, MoDBlock):
            seen = []
            hook = block.register_forward_hook(lambda m, a, out: seen.append(out[1].predictor_logits))
            model(idx, routing="predictor")
            hook.remove()
            block.predictor.out.bias -= torch.quantile(seen[0].float().flatten(), 1 - cfg.capacity)


def median_times(fns, repeats, min_seconds=0.3):
    """Run each function in turn (A B A B ...), repeats times, and return each one's median seconds per call.
    A fast function is called several times per turn (as many as the slowest one needs to take min_seconds), so that
    each timing is long enough to rise above the machine's noise."""
    once = []
    for fn in fns:
        t0 = time.perf_counter()
        fn()
        once.append(time.perf_counter() - t0)
    calls = max(1, round(min_seconds / max(once)))
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[i].append((time.perf_counter() - t0) / calls)
    return [statistics.median(t) for t in times]


class TextbookGPT(torch.nn.Module):
    """The reference for our dense model: a plain GPT forward written the textbook way (nanoGPT's), two residual adds
    per block, no input checks and no routing bookkeeping, on its own copy of the dense model's weights (so it
    computes the same function). Our dense model is timed against it, so that a slow baseline cannot inflate the
    MoD ratio."""

    def __init__(self, dense):
        super().__init__()
        self.model = copy.deepcopy(dense)

    def forward(self, idx, targets):
        t = self.model.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in t.h:
            x = x + block.attn(block.ln_1(x))
            x = x + block.mlp(block.ln_2(x))
        logits = self.model.lm_head(t.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def measured_flops(model, T, device):
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(torch.zeros(1, T, dtype=torch.long, device=device))
    return counter.get_total_flops()


def speed(shape_name, shape, device, dtype, compile_, repeats):
    B = shape["batch_gpu" if device.startswith("cuda") else "batch_cpu"]
    T = shape["block_size"]
    autocast = (contextlib.nullcontext() if dtype == "float32"
                else torch.autocast(device_type="cuda", dtype=getattr(torch, dtype)))
    models = {"dense": build(shape, 0, device), "MoD": build(shape, 2, device)}
    rows = {}

    # training step: forward + backward + AdamW on one batch, for our dense model, MoD and the textbook reference
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (B, T), generator=gen).to(device)
    y = torch.randint(0, VOCAB, (B, T), generator=gen).to(device)
    steps = []
    for model in (models["dense"], models["MoD"], TextbookGPT(models["dense"])):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.split(":")[0] in ("cuda", "cpu"))  # as train.py
        fwd = torch.compile(model) if compile_ else model
        # as train.py calls the model: the data was checked when it was loaded
        kwargs = {} if isinstance(model, TextbookGPT) else dict(check_input=False)

        def step(fwd=fwd, opt=opt, kwargs=kwargs):
            with autocast:
                _, loss = fwd(x, y, **kwargs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
        for _ in range(3 if compile_ else 1):  # warm-up (compilation)
            step()
        steps.append(step)
    t_dense, t_mod, t_textbook = median_times(steps, repeats)
    rows["train step"] = (f"{1000 * t_dense:.1f} ms", f"{1000 * t_mod:.1f} ms", t_dense / t_mod)
    rows["train step, textbook GPT as dense"] = (f"{1000 * t_textbook:.1f} ms", f"{1000 * t_mod:.1f} ms",
                                                 t_textbook / t_mod)

    # generation with the KV cache, batch 1 and 8: one token prompt, block_size - 1 new tokens (no re-prefill)
    calibrate_predictors(models["MoD"], device)
    routed_frac = {}
    for batch in (1, 8):
        calls = []
        for name, model in models.items():
            model.eval()

            def generate(model=model, name=name):
                torch.manual_seed(2)
                with autocast:
                    model.generate(torch.zeros(batch, 1, dtype=torch.long, device=device), T - 1)
                sync(device)
                if name == "MoD":
                    routed = [r[:, 1:-1].float().mean().item() for r in model.last_routing if r is not None]
                    routed_frac[batch] = sum(routed) / len(routed)
            generate()  # warm-up
            calls.append(generate)
        t_dense, t_mod = median_times(calls, repeats)
        n = batch * (T - 1)
        rows[f"generate, batch {batch}"] = (f"{n / t_dense:,.0f} tok/s", f"{n / t_mod:,.0f} tok/s", t_dense / t_mod)

    # FLOPs and KV cache (the last generate of each model above: batch 8)
    est = {name: m.estimate_flops(T) for name, m in models.items()}
    flop_ratio = est["dense"]["total"] / est["MoD"]["total"]
    stack = {name: e["blocks_linear"] + e["blocks_attention"] for name, e in est.items()}
    meas = {name: measured_flops(m, T, device) for name, m in models.items()}
    kv = {name: sum(m.last_cache_nbytes) for name, m in models.items()}
    lines = [f"### {shape_name}: {shape['n_layer']} layers, {shape['n_head']} heads, n_embd {shape['n_embd']}, "
             f"block {T}, train batch {B}",
             "",
             "| measure | dense | MoD | dense/MoD | ideal |",
             "| --- | --- | --- | --- | --- |"]
    for what, (a, b, ratio) in rows.items():
        ideal = f"{flop_ratio:.2f}x (FLOPs)"
        if what == "generate, batch 8":
            ideal = f"< {flop_ratio:.2f}x (weights read when any row routes)"
        lines.append(f"| {what} | {a} | {b} | **{ratio:.2f}x** | {ideal} |")
    lines += [
        f"| forward GFLOPs, estimate | {est['dense']['total'] / 1e9:.3f} | {est['MoD']['total'] / 1e9:.3f} | "
        f"{flop_ratio:.2f}x | block stack alone: {stack['dense'] / stack['MoD']:.2f}x |",
        f"| forward GFLOPs, FlopCounterMode{' (no attention on CPU)' if not device.startswith('cuda') else ''} | "
        f"{meas['dense'] / 1e9:.3f} | {meas['MoD'] / 1e9:.3f} | {meas['dense'] / meas['MoD']:.2f}x | |",
        f"| KV cache after generating, batch 8 | {kv['dense'] / 1024:.0f} KiB | {kv['MoD'] / 1024:.0f} KiB | "
        f"MoD/dense **{kv['MoD'] / kv['dense']:.2f}x** | "
        f"{est['MoD']['blocks_linear'] / est['dense']['blocks_linear']:.2f}x |",
        "",
        f"MoD routed {100 * routed_frac[1]:.1f}% (batch 1) and {100 * routed_frac[8]:.1f}% (batch 8) of generated "
        f"tokens per routed block (calibrated predictors). Our dense training step takes "
        f"{t_dense / t_textbook:.3f}x the time of the textbook GPT's.",
        ""]
    return lines


# -----------------------------------------------------------------------------
# quality: six trainings on shakespeare_char


def run_training(label, log_dir, **settings):
    """train.main with its log in log_dir/<label>.log; returns (result, wall seconds)."""
    buf = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(buf):
        # overwrite: each benchmark replaces the runs of the previous one in bench_runs/
        result = train.main(out_dir=os.path.join(log_dir, label), sample_tokens=0, overwrite=True, **settings)
    wall = time.time() - t0
    with open(os.path.join(log_dir, f"{label}.log"), "w") as f:
        f.write(buf.getvalue())
    if result["interrupted"]:  # Ctrl-C stopped this training: stop the benchmark too
        raise KeyboardInterrupt
    print(f"  {label}: {result['iter_num']} iterations in {wall:.0f} s", file=sys.stderr)
    return result, wall


def quality(device, log_dir, max_iters, eval_iters):
    base = dict(device=device, max_iters=max_iters, lr_decay_iters=max_iters, eval_iters=eval_iters,
                eval_interval=max_iters, log_interval=50)
    _, model_fields = train.resolve_config({"device": device}, "cuda" if device.startswith("cuda") else device)
    T = model_fields["block_size"]
    dense_flops = MoDGPT(MoDConfig(**{**model_fields, "mod_every": 0})).estimate_flops(T)["total"]

    # (c) the MoD depth whose forward FLOPs are closest to the dense model's
    def mod_flops(n_layer):
        return MoDGPT(MoDConfig(**{**model_fields, "n_layer": n_layer})).estimate_flops(T)["total"]
    iso_layers = min(range(model_fields["n_layer"], 3 * model_fields["n_layer"]),
                     key=lambda n: abs(mod_flops(n) - dense_flops))

    runs = {}
    runs["(a) dense"] = run_training("dense", log_dir, mod_every=0, **base)
    runs["(b) MoD, same iterations"] = run_training("mod", log_dir, **base)
    # (b') the same training time as dense: scale MoD's iterations by the two runs' ms per iteration
    # (evaluations excluded: MoD evaluates one more thing, the causal predictor loss)
    iters = round(max_iters * runs["(a) dense"][0]["ms_per_iter"] / runs["(b) MoD, same iterations"][0]["ms_per_iter"])
    runs["(b') MoD, same training time"] = run_training("mod_same_time", log_dir, **{**base, "max_iters": iters,
                                                                                  "lr_decay_iters": iters,
                                                                                  "eval_interval": iters})
    runs[f"(c) MoD isoFLOP, {iso_layers} layers"] = run_training("mod_isoflop", log_dir, n_layer=iso_layers, **base)
    runs["(d) random-routing control"] = run_training("random", log_dir, router="random", **base)
    other = "sigmoid" if MoDConfig(**model_fields).router_weight == "raw" else "raw"  # the default's alternative
    runs[f"(e) MoD, router_weight={other}"] = run_training(other, log_dir, router_weight=other, **base)

    lines = [f"### quality: shakespeare_char, {model_fields['n_layer']} layers x {model_fields['n_embd']} "
             f"(dense), {max_iters} iterations unless noted, {eval_iters} eval batches",
             "",
             "| run | iterations | forward FLOPs vs dense | val loss (top-k) | val loss (causal predictor) | "
             "causal gap | predictor accuracy | ms/iter | wall time (with evals) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, (result, wall) in runs.items():
        ev = result["eval"]
        layers = iso_layers if "isoFLOP" in label else model_fields["n_layer"]
        flops = dense_flops if "dense" in label else mod_flops(layers)
        causal = ev.get("val_predictor")
        gap = f"{100 * (causal / ev['val_topk'] - 1):+.2f}%" if causal else ""
        timing = f"{result['ms_per_iter']:.1f} | {wall:.0f} s"
        lines.append(f"| {label} | {result['iter_num']} | {flops / dense_flops:.2f}x | {ev['val_topk']:.4f} | "
                     f"{causal:.4f} | {gap} | {100 * ev['predictor_acc']:.1f}% | {timing} |" if causal else
                     f"| {label} | {result['iter_num']} | 1.00x | {ev['val_topk']:.4f} | | | | {timing} |")
    return lines + [""]


# -----------------------------------------------------------------------------
# figures: loss curves and routing maps, for the README (--figures) and tutorial.ipynb


def pyplot(headless=False):
    """matplotlib's pyplot, imported only to draw. headless: draw into files only (no window), for --figures."""
    try:
        import matplotlib
        if headless:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: drawing needs matplotlib, which is optional: pip install matplotlib") from None
    return plt


def read_metrics(out_dir):
    """The history that train.py wrote to out_dir/metrics.jsonl: one dict per log line or evaluation."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"error: no {path}: train into that folder first (python train.py --out_dir={out_dir})")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curves(runs, title="validation loss"):
    """Validation loss against iterations and against training time (evaluations excluded), one colour per run.
    runs: {label: history}, a history being train.main's result["history"] or read_metrics(out_dir). A MoD run
    draws two lines: top-k routing (solid, as in training) and causal predictor routing (dashed, as when sampling).
    Returns the matplotlib figure."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    top = []
    for n, (label, history) in enumerate(runs.items()):
        evals = [r for r in history if r["kind"] == "eval"]
        routed = any("val_predictor" in r for r in evals)
        for key, style, kind in (("val_topk", "-", ", top-k"), ("val_predictor", "--", ", causal predictor")):
            points = [r for r in evals if key in r]
            if not points:
                continue
            for ax, x in zip(axes, ("iter", "time_s")):
                ax.plot([r[x] for r in points], [r[key] for r in points], style, color=f"C{n}", marker=".",
                        label=label + (kind if routed else ""))
            top.append(points[min(1, len(points) - 1)][key])  # zoom in below the untrained model's loss
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("training time (s, evaluations excluded)")
    axes[0].set_ylabel(title)
    if top:
        axes[0].set_ylim(top=max(top) + 0.05)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def token_text(tokenizer, token):
    """A token as a short label: newline and space made visible."""
    return tokenizer.decode([token]).replace("\n", "\u21b5").replace(" ", "\u2423")


@torch.no_grad()
def routing_rows(model, idx):
    """Which tokens of one sequence idx (1, T) each routed block processes under top-k routing and under causal
    predictor routing. Returns [(block, topk (T,) bool, predictor (T,) bool), ...]."""
    model.eval()
    seen = {}
    for routing in ("topk", "predictor"):
        model(idx, routing=routing)
        seen[routing] = model.last_routing
    return [(i, seen["topk"][i][0].cpu(), seen["predictor"][i][0].cpu()) for i in model.config.routed_blocks()]


def plot_routing_map(model, tokenizer, idx, title="routing map", per_line=64, max_tokens=128):
    """The paper's Fig. 5 for one sequence idx (1, T): tokens across, for each routed block a row for top-k's
    choice and a row for the causal predictor's, wrapped per_line tokens to a panel. In the predictor's row, orange
    marks a token it routes that top-k would not, pink one top-k routes that it skips. Returns the figure."""
    plt = pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    rows = routing_rows(model, idx)
    tokens = idx[0].tolist()[:max_tokens]
    grid, labels = [], []
    for block, topk, pred in rows:
        grid.append(topk.long())  # 0 skipped, 1 routed
        grid.append(torch.where(pred == topk, pred.long(), torch.where(pred, 2, 3)))  # 2, 3: disagrees with top-k
        labels += [f"block {block} top-k", f"block {block} predictor"]
    grid = torch.stack(grid)[:, :len(tokens)]  # (2 x routed blocks, T)
    colors = ListedColormap(["#f4f4f4", "#2b6cb0", "#f08a24", "#f6b8c8"])
    panels = math.ceil(len(tokens) / per_line)
    width = 0.17 * min(per_line, len(tokens)) + 1.8  # inches
    height = panels * (0.32 * len(grid) + 0.7) + 0.6
    fig, axes = plt.subplots(panels, 1, figsize=(width, height), squeeze=False)
    for p, ax in enumerate(axes[:, 0]):
        part = slice(p * per_line, (p + 1) * per_line)
        ax.imshow(grid[:, part].numpy(), cmap=colors, vmin=0, vmax=3, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(tokens[part])))
        ax.set_xticklabels([token_text(tokenizer, t) for t in tokens[part]], fontsize=8, family="monospace",
                           rotation=0 if tokenizer.enc is None else 90)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.tick_params(length=0)
        for y in range(2, len(labels), 2):
            ax.axhline(y - 0.5, color="white", linewidth=3)
    axes[0, 0].set_title(title, fontsize=10)
    fig.legend(handles=[Patch(color=colors(1), label="processed by the block"),
                        Patch(color=colors(2), label="predictor routes, top-k would not"),
                        Patch(color=colors(3), label="top-k routes, predictor skips")],
               loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


@torch.no_grad()
def routed_token_rates(model, tokenizer, idx, min_count=20):
    """How often top-k routes each token, per routed block, over the sequences idx (N, T) (for instance validation
    batches). Returns one dict per token seen at least min_count times, the most routed first: text, count, rates
    (per routed block) and mean (over them)."""
    model.eval()
    model(idx, routing="topk")
    V = model.config.vocab_size
    count = torch.bincount(idx.flatten().cpu(), minlength=V)
    blocks = model.config.routed_blocks()
    routed = torch.stack([torch.bincount(idx[model.last_routing[i]].cpu(), minlength=V) for i in blocks])  # (n, V)
    rates = routed / count.clamp(min=1)
    table = [dict(token=t, text=token_text(tokenizer, t), count=int(count[t]), rates=rates[:, t].tolist(),
                  mean=rates[:, t].mean().item()) for t in range(V) if count[t] >= min_count]
    return sorted(table, key=lambda row: -row["mean"])


def plot_routed_tokens(table, blocks, capacity, top=20):
    """Bars of the top most-routed tokens of routed_token_rates(), one bar per routed block; the dashed line is
    the capacity, what every token would get if routing ignored which token it is. Returns the figure."""
    plt = pyplot()
    rows = table[:top]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.42 * len(rows) + 1.5), 3.2))
    width = 0.8 / len(blocks)
    for b, block in enumerate(blocks):
        ax.bar([i + (b - (len(blocks) - 1) / 2) * width for i in range(len(rows))],
               [100 * row["rates"][b] for row in rows], width, label=f"block {block}", color=f"C{b}")
    ax.axhline(100 * capacity, color="black", linestyle="--", linewidth=1, label=f"capacity {capacity:.1%}")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([row["text"] for row in rows], family="monospace")
    ax.set_ylabel("% of its occurrences routed")
    ax.set_title("the tokens top-k routes most", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def figures(device, folder=os.path.join(HERE, "figures"), runs_dir=os.path.join(HERE, "bench_runs", "figures"),
            **settings):
    """python bench.py --figures: the README's two pictures from two trainings (see the top of this file).
    settings: more train.py settings for both runs (none for the README's pictures)."""
    plt = pyplot(headless=True)  # before training: a missing matplotlib is one line, not minutes later
    os.makedirs(runs_dir, exist_ok=True)
    os.makedirs(folder, exist_ok=True)
    for label, layout in (("dense", dict(mod_every=0)), ("mod", {})):
        resume = os.path.exists(os.path.join(runs_dir, label, "ckpt.pt"))
        print(f"figures: {'resuming' if resume else 'training'} {label} in {os.path.join(runs_dir, label)} "
              f"(log: {os.path.join(runs_dir, label)}.log) ...", file=sys.stderr)
        run_training(label, runs_dir, device=device, init_from="resume" if resume else "scratch",
                     **{**settings, **layout})
    mod_dir = os.path.join(runs_dir, "mod")
    fig = plot_loss_curves({"dense": read_metrics(os.path.join(runs_dir, "dense")), "MoD": read_metrics(mod_dir)},
                           title="validation loss, shakespeare_char")
    paths = [os.path.join(folder, "loss_curves.png"), os.path.join(folder, "routing_map.png")]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    model, tokenizer = sample.load_model(mod_dir, device)
    torch.manual_seed(1337)
    start = torch.tensor([[tokenizer.newline_or_eot]], device=device)
    ids = model.generate(start, model.config.block_size - 1, temperature=0.8, top_k=200)  # (1, block_size)
    fig = plot_routing_map(model, tokenizer, ids, title="a sample of the MoD model: the tokens each routed block "
                                                        "processes")
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    for path in paths:
        print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KB)", file=sys.stderr)
    return paths


def machine(device):
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


def check_args(args, device):
    """Every argument, before the benchmark runs (it takes minutes): one ConfigError that says what to do."""
    def need(ok, message):
        if not ok:
            raise train.ConfigError(message)
    for name in ("repeats", "quality_iters", "eval_iters"):
        need(getattr(args, name) >= 1, f"--{name} must be >= 1, got {getattr(args, name)}")
    need(args.dtype == "float32" or device.startswith("cuda"),
         "--dtype bfloat16/float16 is for CUDA GPUs; leave it out on a CPU")
    unknown = set(args.shapes.split(",")) - SHAPES.keys()
    need(not unknown, f"unknown shape(s) {sorted(unknown)}: choose from {', '.join(SHAPES)}")
    need(not os.path.isdir(args.out), f"--out={args.out} is a folder: name a file, e.g. "
                                      f"--out={os.path.join(args.out, 'bench.md')}")
    folder = os.path.dirname(os.path.abspath(args.out))
    need(os.path.isdir(folder), f"--out={args.out}: there is no folder {folder}; create it or choose another --out")
    try:
        train.check_writable(folder)
    except OSError as e:
        raise train.ConfigError(f"--out={args.out}: cannot write to {folder} ({e.strerror}); choose another --out")


def main(argv):
    p = train.ArgumentParser(prog="bench.py", description="Dense vs MoD, side by side (see the top of bench.py).")
    p.add_argument("--device", default="", help="cpu or cuda (default: the best available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the models for the training step")
    p.add_argument("--repeats", type=int, default=5, help="repeats per measurement (the median is reported)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from: {', '.join(SHAPES)}")
    p.add_argument("--quality", action="store_true", help="also run the six trainings (minutes)")
    p.add_argument("--quality_iters", type=int, default=2000)
    p.add_argument("--eval_iters", type=int, default=200)
    p.add_argument("--out", default="bench.md", help="where to write the markdown (default: bench.md)")
    p.add_argument("--figures", action="store_true", help="only draw the README's pictures into figures/ (minutes)")
    try:
        args = p.parse_args(argv)
        device = train.pick_device(args.device)
        check_args(args, device)
        if args.figures:  # the pictures alone: no speed measurement, no markdown
            figures(device)
        else:
            run(args, argv, device)
    except (train.ConfigError, train.DataError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:  # anything not caught closer to its cause: still one line, naming the path
        raise SystemExit(f"error: {train.describe_os_error(e)}: check the path and its permissions") from None
    except KeyboardInterrupt:
        print("stopped: nothing written to --out", file=sys.stderr)
        sys.exit(130)


def run(args, argv, device):
    lines = [f"## bench.py on {machine(device)}", "",
             f"`python bench.py {' '.join(argv)}`".replace(" `", "`"), "",
             f"dtype {args.dtype}{', torch.compile' if args.compile else ''}, median of {args.repeats} interleaved "
             f"repeats; MoD: capacity 12.5%, every other block routed.", ""]
    for name in args.shapes.split(","):
        print(f"speed: {name} ...", file=sys.stderr)
        lines += speed(name, SHAPES[name], device, args.dtype, args.compile, args.repeats)
    if args.quality:
        print("quality: training six models ...", file=sys.stderr)
        log_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)), "bench_runs")
        os.makedirs(log_dir, exist_ok=True)
        lines += quality(device, log_dir, args.quality_iters, args.eval_iters)
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
