"""
Does Mixture-of-Depths pay off? Dense and MoD models of the same shape, measured side by side in one process.

    python bench.py                     # speed: a CPU-sized shape and nanoGPT's shakespeare_char shape
    python bench.py --quality           # and quality: short trainings on shakespeare_char (~25 minutes on a CPU)
    python bench.py --device=cuda --dtype=bfloat16 [--compile]   # the speed part on a GPU

Speed (dense vs MoD at 12.5% capacity on every other block): the two models take turns (A B A B ...) and each figure
is the median of several repeats, because shared machines are noisy. It reports the training step (forward, backward
and AdamW), generation tokens/s with the KV cache at batch 1 and 8, forward FLOPs measured by FlopCounterMode next
to the estimate, and KV-cache bytes. Every speed ratio is shown against its ideal, the FLOP ratio.
The models are untrained; so that generation routes what a trained predictor routes, each predictor's bias is set
so that it routes `capacity` of the tokens of a calibration batch.

Quality: trainings on the same data with the same seed (one seed: experiments/seeds.py repeats the key rows over
seeds), all measured on the same validation windows (so that two models can be compared window by window, with
standard errors), in two settings. At block 64 (train.py's CPU default): dense; the shallow control (dense without
the routed blocks: what the routed blocks must beat); MoD for as many iterations and for the same training time; the
random-routing control; the nearest-FLOP MoD (the depth whose FLOPs per forward pass are nearest dense's: deeper,
not isoFLOP), also trained with the router's own aux loss (the paper's causal method 1); and MoD with the other
router_weight. At block 256 (long sequences, sized for a CPU): dense, shallow, MoD, random.
It reports validation loss under top-k and causal routing, the causal rule's accuracy and balanced accuracy per
routed block (on top-k inputs and on the causally routed inputs met when sampling), time, and a per-position check:
the loss at the last position against the middle, MoD against dense (README: the last-position anomaly).

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
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import sample
import train
from data.prepare import dataset_dir, load_dataset, prepare_if_missing
from mod import MoDBlock, MoDConfig, MoDGPT, confusion, predictor_scores
from plumbing import (ArgumentParser, ConfigError, autocast_for, check_writable, peak_flops, pick_device, pick_dtype,
                      read_metrics, require, run_cli)

SHAPES = {  # model shape and training batch size (the GPU batch of shakespeare_char is nanoGPT's)
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_cpu=12, batch_gpu=12),
    "shakespeare_char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_cpu=8, batch_gpu=64),
}
VOCAB = 65
HERE = os.path.dirname(os.path.abspath(__file__))


def sync(device):
    """Wait for the GPU the models run on (not merely the current one) to finish what was queued."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


class OpCount(TorchDispatchMode):
    """Counts the aten operations a piece of code dispatches (views, which launch nothing, left out): in eager mode
    on a GPU each is a kernel launch and host time."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


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
    blocks = [block for block in model.transformer.h if isinstance(block, MoDBlock)]
    for j, block in enumerate(blocks):
        model(idx, routing="predictor")
        logits = model.last_infos[j].predictor_logits
        block.predictor.out.bias -= torch.quantile(logits.float().flatten(), 1 - cfg.capacity)


def median_times(fns, repeats, min_seconds=0.3):
    """Each function's median seconds per call over interleaved_times' rounds."""
    return [statistics.median(t) for t in interleaved_times(fns, repeats, min_seconds)]


def interleaved_times(fns, repeats, min_seconds=0.3):
    """Run each function in turn (A B A B ...), repeats times, and return each one's seconds per call in every round.
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
    return times


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


def milliseconds(seconds):
    """A time for the tables, precise to 0.5% or better, so that ratios computed from the table hold: 612.6 ms, 1.061
    ms."""
    ms = 1000 * seconds
    return f"{ms:.1f} ms" if ms >= 10 else f"{ms:.3f} ms"


def measured_flops(model, T, device):
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(torch.zeros(1, T, dtype=torch.long, device=device))
    return counter.get_total_flops()


def train_steps(models, x, y, device, autocast, compiled):
    """One training step (forward, backward, AdamW) per model, as a function; compiled: through torch.compile,
    warmed up (compiled) here."""
    steps = []
    for model in models:
        model.train()
        opt = train.configure_optimizer(model, train.TrainConfig(learning_rate=1e-4), device.split(":")[0])
        fwd = torch.compile(model) if compiled else model
        # as train.py calls the model: the data was checked when it was loaded
        kwargs = {} if isinstance(model, TextbookGPT) else dict(check_input=False)

        def step(fwd=fwd, opt=opt, kwargs=kwargs):
            with autocast:
                _, loss = fwd(x, y, **kwargs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
        for _ in range(3 if compiled else 1):  # warm-up (and compilation)
            step()
        steps.append(step)
    return steps


def peak_memory(step, device):
    """Bytes of GPU memory a training step needs at its peak (None on a CPU, which has no such counter)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.reset_peak_memory_stats(device)
    step()
    return torch.cuda.max_memory_allocated(device)


def speed(shape_name, shape, device, dtype, modes, repeats):
    """The speed table of one shape: for each mode ("eager", "compiled") the training step of dense, MoD and the
    textbook GPT, with MFU and peak memory where the device tells them; the ops an eager step dispatches; generation
    at batch 1 and 8; FLOPs; KV cache."""
    B = shape["batch_gpu" if device.startswith("cuda") else "batch_cpu"]
    T = shape["block_size"]
    autocast = autocast_for(dtype, device.split(":")[0])
    models = {"dense": build(shape, 0, device), "MoD": build(shape, 2, device)}
    rows, notes = {}, {}
    peak = peak_flops(0, device)  # known GPUs; None on a CPU

    # training step: forward + backward + AdamW on one batch, for our dense model, MoD and the textbook reference
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (B, T), generator=gen).to(device)
    y = torch.randint(0, VOCAB, (B, T), generator=gen).to(device)
    for mode in modes:
        suffix = "" if mode == "eager" else ", compiled"
        steps = train_steps([models["dense"], models["MoD"], TextbookGPT(models["dense"])], x, y, device, autocast,
                            compiled=mode == "compiled")
        step_dense, step_mod, step_textbook = median_times(steps, repeats)
        rows[f"train step{suffix}"] = (milliseconds(step_dense), milliseconds(step_mod), step_dense / step_mod)
        rows[f"train step{suffix}, textbook GPT as dense"] = (milliseconds(step_textbook), milliseconds(step_mod),
                                                              step_textbook / step_mod)
        if mode == "eager":
            notes["textbook"] = step_dense / step_textbook
            counts = []
            for step in steps[:2]:
                with OpCount() as ops:
                    step()
                counts.append(ops.count)
            rows["aten ops per train step (eager)"] = (f"{counts[0]}", f"{counts[1]}", counts[0] / counts[1])
        if peak:  # forward + backward is ~3x the forward's FLOPs
            mfu = [3 * m.estimate_flops(T)["total"] * B / t / peak for m, t in zip(models.values(),
                                                                                (step_dense, step_mod))]
            rows[f"MFU, train step{suffix}"] = (f"{100 * mfu[0]:.1f}%", f"{100 * mfu[1]:.1f}%", mfu[0] / mfu[1])
        memory = [peak_memory(step, device) for step in steps[:2]]
        if memory[0]:
            rows[f"peak memory, train step{suffix}"] = (f"{memory[0] / 2**20:,.0f} MiB",
                                                        f"{memory[1] / 2**20:,.0f} MiB", memory[0] / memory[1])

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
        if what.startswith(("aten ops", "MFU", "peak memory")):
            ideal = ""
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
        f"{notes['textbook']:.3f}x the time of the textbook GPT's.",
        ""]
    return lines


# -----------------------------------------------------------------------------
# quality: trainings on shakespeare_char, all compared on the same validation windows

# The two settings of --quality: model shape and batch size. Each training runs --quality_iters iterations.
# "block 64" is train.py's CPU default (nanoGPT's laptop setting). Its two routed blocks are worth little there (the
# shallow control, a 2-layer dense model, comes close to the 4-layer one), so it shows that nothing is broken more
# than what routing is worth. "block 256" has the sequence length of nanoGPT's GPU setting: a routed block picks 32
# of 256 tokens (the paper's: 256 of 2048), and the routed blocks are worth more (the shallow control falls further
# behind). It keeps the CPU default's width and depth at batch 8, so that the whole --quality run stays under ~25
# minutes on 2 CPU cores (19 minutes on the README's machine).
QUALITY_SETTINGS = {
    "block 64": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    "block 256": dict(n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=8),
}
ROUTER_AUX_LOSS = 0.01  # router_aux_loss of the method-1 run (the paper gives no weight)
EVAL_TOKENS = 4096  # per --eval_iters: the validation windows of a setting hold eval_iters * EVAL_TOKENS tokens


def val_windows(data_dir, T, n):
    """n windows of T + 1 tokens from val.bin, evenly spaced, as a (n, T + 1) tensor: the same windows for every
    model, so that two models can be compared window by window (paired), which cancels most of the text's noise."""
    data = np.memmap(os.path.join(data_dir, "val.bin"), dtype=np.uint16, mode="r")
    starts = torch.linspace(0, len(data) - T - 1, n).long().tolist()
    return torch.stack([torch.from_numpy(data[s:s + T + 1].astype(np.int64)) for s in starts])


@torch.no_grad()
def position_losses(model, windows, routing="topk", batch=64):
    """The LM loss at every position of every window: (N, T) for windows (N, T + 1), under `routing`. (The random
    control draws noise from torch's generator: seed it first for numbers that repeat.)"""
    model.eval()
    device = model.lm_head.weight.device
    out = []
    for w in windows.split(batch):
        w = w.to(device)
        logits, _ = model(w[:, :-1], routing=routing)  # (b, T, vocab)
        out.append(F.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none").cpu())  # (b, T)
    return torch.cat(out)


def mean_se(values, groups=20):
    """The mean of values (N,), one per window in text order, and its standard error. Neighbouring windows share
    text, so the error comes from the spread of the means of `groups` contiguous groups, not from N values taken as
    independent."""
    values = values.double()
    means = torch.stack([g.mean() for g in values.tensor_split(groups)])
    return values.mean().item(), (means.std() / math.sqrt(groups)).item()


def last_vs_middle(losses):
    """Per window, the loss at the last position minus the mean loss over positions T/2 to T-3 (32-61 at T = 64):
    (N,) for losses (N, T). Around 0 for a model whose last position is no harder to predict than the middle."""
    T = losses.size(1)
    return losses[:, -1] - losses[:, T // 2:T - 2].mean(1)


@torch.no_grad()
def routing_accuracy(model, windows, routing="topk", rule="predictor", batch=64):
    """Per routed block: how well a causal rule (rule="predictor": predictor logit > 0; "router": router logit > 0)
    matches the block's top-k on the same input (mod.predictor_scores: accuracy, balanced accuracy, precision,
    recall), with every routed block routed by `routing`; and the share of tokens the block processed. Under
    routing="topk" these are the scores training reports. Under a causal routing each block's input comes from
    earlier blocks that routed causally, as when sampling, and the top-k it is compared with is what the block's
    router picks on that input. Returns (one dict of scores per routed block, routed shares)."""
    model.eval()
    device = model.lm_head.weight.device
    blocks = [b for b in model.transformer.h if isinstance(b, MoDBlock)]
    counts, routed, n = [0] * len(blocks), torch.zeros(len(blocks)), 0
    for w in windows.split(batch):
        model(w[:, :-1].to(device), routing=routing)
        for j, info in enumerate(model.last_infos):  # one RoutingInfo per routed block
            logits = info.predictor_logits if rule == "predictor" else info.router_logits
            counts[j] = counts[j] + confusion(logits > 0, info.topk).cpu()
            routed[j] += info.processed.sum().item()
        n += w[:, :-1].numel()
    return [predictor_scores(c) for c in counts], (routed / n).tolist()


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


def quality_run(label, log_dir, windows, causal=(), **settings):
    """Train one model, then measure it on the validation windows: per-position losses under top-k and under each
    causal routing in `causal`, and the per-block accuracy of the causal rules. Returns a dict."""
    result, wall = run_training(label, log_dir, **settings)
    model, _ = sample.load_model(os.path.join(log_dir, label), settings["device"], checkpoint="latest")
    run = dict(result=result, wall=wall, model=model, losses={}, accuracy={}, routed={})
    for routing in ("topk",) + tuple(causal):
        torch.manual_seed(0)  # the random control's noise: the same for every routing
        run["losses"][routing] = position_losses(model, windows, routing)
    for routing in causal:  # the rule that routes causally, on top-k inputs and on its own (causal) inputs
        torch.manual_seed(0)
        run["accuracy"][routing, "topk"], _ = routing_accuracy(model, windows, "topk", rule=routing)
        torch.manual_seed(0)
        run["accuracy"][routing, routing], run["routed"][routing] = routing_accuracy(model, windows, routing,
                                                                                     rule=routing)
    return run


def percents(values):
    return " / ".join(f"{100 * v:.1f}" for v in values)


def score_percents(scores):
    """Per block "accuracy (balanced accuracy)", in percent: accuracy alone flatters (mod.predictor_scores)."""
    return " / ".join(f"{100 * s['accuracy']:.1f} ({100 * s['balanced']:.1f})" for s in scores)


def quality_setting(name, shape, device, log_dir, iters, eval_iters, data_dir, full):
    """The trainings of one setting and its tables. full: also the block-64-only runs (same training time, nearest-FLOP
    with and without the router's aux loss, the other router_weight)."""
    shape = dict(shape)
    batch_size = shape.pop("batch_size")
    T = shape["block_size"]
    base = dict(device=device, batch_size=batch_size, max_iters=iters, lr_decay_iters=iters, eval_interval=iters,
                eval_iters=max(1, eval_iters // 10), log_interval=50, **shape)  # train.py's own eval: a glance
    windows = val_windows(data_dir, T, max(20, eval_iters * EVAL_TOKENS // T))

    def flops(**fields):
        return MoDGPT(MoDConfig(**{**shape, **fields})).estimate_flops(T)["total"]
    dense_flops = flops(mod_every=0)
    n_dense = sum(not MoDConfig(**shape).is_routed(i) for i in range(shape["n_layer"]))  # MoD's dense blocks
    iso_layers = min(range(shape["n_layer"], 3 * shape["n_layer"]), key=lambda n: abs(flops(n_layer=n) - dense_flops))
    causal = ("predictor",)
    tag = name.replace(" ", "")
    runs = {}  # label -> (run, flops)
    runs["dense"] = (quality_run(f"{tag}_dense", log_dir, windows, mod_every=0, **base), dense_flops)
    runs[f"shallow control: dense, {n_dense} layers"] = (
        quality_run(f"{tag}_shallow", log_dir, windows, **{**base, "mod_every": 0, "n_layer": n_dense}),
        flops(mod_every=0, n_layer=n_dense))
    runs["MoD"] = (quality_run(f"{tag}_mod", log_dir, windows, causal, **base), flops())
    if full:  # the same training time as dense: MoD's iterations scaled by the two runs' ms per iteration
        same = round(iters * runs["dense"][0]["result"]["ms_per_iter"] / runs["MoD"][0]["result"]["ms_per_iter"])
        runs["MoD, same training time"] = (quality_run(f"{tag}_mod_same_time", log_dir, windows, causal, **{
            **base, "max_iters": same, "lr_decay_iters": same, "eval_interval": same}), flops())
    runs["random-routing control"] = (quality_run(f"{tag}_random", log_dir, windows, causal, router="random",
                                                  **base), flops())
    if full:
        iso = dict(n_layer=iso_layers)
        runs[f"nearest-FLOP MoD, {iso_layers} layers (deeper, not isoFLOP)"] = (
            quality_run(f"{tag}_isoflop", log_dir, windows, causal, **{**base, **iso}), flops(**iso))
        runs[f"nearest-FLOP MoD, {iso_layers} layers, router_aux_loss={ROUTER_AUX_LOSS}"] = (
            quality_run(f"{tag}_isoflop_aux", log_dir, windows, ("predictor", "router"),
                        **{**base, **iso}, router_aux_loss=ROUTER_AUX_LOSS), flops(**iso))
        runs["MoD, router_weight=sigmoid"] = (
            quality_run(f"{tag}_sigmoid", log_dir, windows, causal, router_weight="sigmoid", **base), flops())

    dense = runs["dense"][0]["losses"]["topk"]
    lines = [f"### quality, {name}: {shape['n_layer']} layers x {shape['n_embd']}, batch {batch_size}, "
             f"{iters} iterations unless noted; {len(windows):,} validation windows of {T} tokens",
             "",
             "| run | iterations | forward FLOPs vs dense | val loss, top-k | vs dense (paired) | val loss, causal | "
             "causal gap | causal rule's accuracy (balanced accuracy) per routed block (%), top-k inputs | "
             "the same, causal inputs | "
             "routed when causal (%) | ms/iter | wall time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, (run, run_flops) in runs.items():
        L = run["losses"]["topk"]
        diff, se = mean_se(L.mean(1) - dense.mean(1))
        start = (f"| {label} | {run['result']['iter_num']} | {run_flops / dense_flops:.2f}x | {L.mean():.4f} | "
                 + ("" if label == "dense" else f"{diff:+.4f} ± {se:.4f}") + " | ")
        end = f" | {run['result']['ms_per_iter']:.1f} | {run['wall']:.0f} s |"
        if not run["accuracy"]:
            lines.append(start + "| | | | |" + end)
        for routing in run["losses"]:
            if routing == "topk":
                continue
            causal_loss = run["losses"][routing].mean()
            if routing == "router":  # a second causal rule of the same model: a row of its own
                start, end = f"| {label}: causal rule router > 0 | | | | | ", " | | |"
            lines.append(start + f"{causal_loss:.4f} | {100 * (causal_loss / L.mean() - 1):+.2f}% | "
                         f"{score_percents(run['accuracy'][routing, 'topk'])} | "
                         f"{score_percents(run['accuracy'][routing, routing])} | {percents(run['routed'][routing])}"
                         + end)

    # what the routed blocks are worth: the shallow control is the MoD model without them
    shallow = next(run for label, (run, _) in runs.items() if label.startswith("shallow"))["losses"]["topk"].mean()
    learned = runs["MoD"][0]["losses"]
    random = runs["random-routing control"][0]["losses"]
    gap = shallow - dense.mean()
    lines += ["",
              f"- The routed blocks are worth {shallow - learned['topk'].mean():+.4f} nats with learned routing "
              f"({shallow - learned['predictor'].mean():+.4f} causal) and {shallow - random['topk'].mean():+.4f} "
              f"with random routing, against the shallow control; full dense blocks instead are worth {gap:+.4f}.",
              "- The random control routes on Gaussian noise, which is also its weight (the paper's control). Its "
              "predictor has nothing to learn and learns to route (almost) nothing, so its causal loss is that of the "
              "model without its routed blocks: its causal gap means nothing.",
              ""]

    # the per-position check (README: the last-position anomaly): is the last position much harder to predict than
    # the middle, MoD against dense? A run is flagged when its excess over dense is both clear (3 standard errors)
    # and large (0.02 nats).
    lines += [f"| run | last position minus positions {T // 2}-{T - 3}, top-k | the same, minus dense's (paired) | |",
              "| --- | --- | --- | --- |"]
    for label, (run, _) in runs.items():
        d = last_vs_middle(run["losses"]["topk"])
        excess = flag = ""
        if label != "dense":
            mean, se = mean_se(d - last_vs_middle(dense))
            excess = f"{mean:+.4f} ± {se:.4f}"
            flag = "**the last position is anomalous**" if mean > max(0.02, 3 * se) else ""
        lines.append(f"| {label} | {'{:+.4f} ± {:.4f}'.format(*mean_se(d))} | {excess} | {flag} |")
    return lines + [""]


def quality(device, log_dir, max_iters, eval_iters):
    data_dir = dataset_dir("shakespeare_char")
    prepare_if_missing("shakespeare_char", data_dir, 256)  # prepared once, on first use
    load_dataset(data_dir, "shakespeare_char", 256)  # checked
    lines = []
    for name, shape in QUALITY_SETTINGS.items():
        print(f"quality: {name} ...", file=sys.stderr)
        lines += quality_setting(name, shape, device, log_dir, max_iters, eval_iters, data_dir,
                                 full=name == "block 64")
    return lines


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


def run_history(out_dir):
    """The history that train.py wrote to out_dir/metrics.jsonl: one dict per log line or evaluation."""
    path = os.path.join(out_dir, "metrics.jsonl")
    require(os.path.exists(path), f"no {path}: train into that folder first (python train.py --out_dir={out_dir})")
    return read_metrics(path)


def plot_loss_curves(runs, title=None):
    """Validation loss against iterations and against training time (evaluations excluded), one colour per run.
    runs: {label: history}, a history being train.main's result["history"] or run_history(out_dir). A MoD run
    draws two lines: top-k routing (solid, as in training) and causal predictor routing (dashed, as when sampling).
    title: a line above both plots, best what was trained and the command that drew it. Returns the figure."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.9), sharey=True)
    top = []
    for n, (label, history) in enumerate(runs.items()):
        evals = [r for r in history if r["kind"] == "eval"]
        routed = any("val_predictor" in r for r in evals)
        for key, style, kind in (("val_topk", "-", ", top-k routing (as in training)"),
                                 ("val_predictor", "--", ", causal predictor routing (as when sampling)")):
            points = [r for r in evals if key in r]
            if not points:
                continue
            for ax, x in zip(axes, ("iter", "time_s")):
                ax.plot([r[x] for r in points], [r[key] for r in points], style, color=f"C{n}", marker=".",
                        label=label + (kind if routed else ""))
            top.append(points[min(1, len(points) - 1)][key])  # zoom in below the untrained model's loss
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("training time (s, evaluations excluded)")
    axes[0].set_ylabel("validation loss (nats per token)")
    if top:
        axes[0].set_ylim(top=max(top) + 0.05)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
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
    marks a token it routes that top-k would not, pink one top-k routes that it skips. Under the title, the
    predictor's precision (of the tokens it routes, how many top-k routes too) and recall (of top-k's tokens, how
    many it routes) on the tokens shown: not its accuracy, which would count the many tokens both skip. Returns the
    figure."""
    plt = pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    rows = routing_rows(model, idx)
    tokens = idx[0].tolist()[:max_tokens]
    grid, labels, scores = [], [], []
    for block, topk, pred in rows:
        topk, pred = topk[:len(tokens)], pred[:len(tokens)]
        grid.append(topk.long())  # 0 skipped, 1 routed
        grid.append(torch.where(pred == topk, pred.long(), torch.where(pred, 2, 3)))  # 2, 3: disagrees with top-k
        labels += [f"block {block} top-k", f"block {block} predictor"]
        both = (pred & topk).sum().item()
        scores.append(f"block {block} precision {both}/{pred.sum().item()}, recall {both}/{topk.sum().item()}")
    grid = torch.stack(grid)  # (2 x routed blocks, T)
    colors = ListedColormap(["#f4f4f4", "#2b6cb0", "#f08a24", "#f6b8c8"])
    panels = math.ceil(len(tokens) / per_line)
    width = 0.17 * min(per_line, len(tokens)) + 1.8  # inches
    columns = 4 if width > 11 else 2  # the legend's
    legend = 0.17 * (4 // columns + 1) + 0.1  # inches below the panels
    height = panels * (0.32 * len(grid) + 0.7) + 0.5 + legend
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
    axes[0, 0].set_title(f"{title}\npredictor vs top-k on these {len(tokens)} tokens: " + "; ".join(scores),
                         fontsize=10)
    fig.legend(handles=[Patch(facecolor=colors(0), edgecolor="#999999", label="skipped: goes around the block"),
                        Patch(color=colors(1), label="processed by the block"),
                        Patch(color=colors(2), label="predictor routes, top-k would not"),
                        Patch(color=colors(3), label="top-k routes, predictor skips")],
               loc="lower center", ncol=columns, fontsize=8, frameon=False, title_fontsize=8,
               title="a top-k row is grey or blue; a predictor row too where it agrees with top-k")
    fig.tight_layout(rect=(0, legend / height, 1, 1))
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


def plot_routed_tokens(table, blocks, capacity, top=20, title="the tokens top-k routes most"):
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
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def figures(device, folder=os.path.join(HERE, "figures"), runs_dir=os.path.join(HERE, "bench_runs", "figures"),
            **settings):
    """python bench.py --figures: the README's two pictures from two trainings (see the top of this file), each
    titled with its setting and this command; the numbers for their captions go to stderr.
    settings: more train.py settings for both runs (none for the README's pictures)."""
    plt = pyplot(headless=True)  # before training: a missing matplotlib is one line, not minutes later
    os.makedirs(runs_dir, exist_ok=True)
    os.makedirs(folder, exist_ok=True)
    results = {}
    for label, layout in (("dense", dict(mod_every=0)), ("mod", {})):
        resume = os.path.exists(os.path.join(runs_dir, label, "ckpt.pt"))
        print(f"figures: {'resuming' if resume else 'training'} {label} in {os.path.join(runs_dir, label)} "
              f"(log: {os.path.join(runs_dir, label)}.log) ...", file=sys.stderr)
        results[label], _ = run_training(label, runs_dir, device=device, init_from="resume" if resume else "scratch",
                                         **{**settings, **layout})
    mod_dir = os.path.join(runs_dir, "mod")
    model, tokenizer = sample.load_model(mod_dir, device)
    cfg = model.config
    dataset = settings.get("dataset", train.TrainConfig.dataset)
    setting = (f"{dataset}, {cfg.n_layer} x {cfg.n_embd}, block {cfg.block_size}, "
               f"{results['mod']['iter_num']} iterations, one seed; python bench.py --figures")
    fig = plot_loss_curves({"dense": run_history(os.path.join(runs_dir, "dense")), "MoD": run_history(mod_dir)},
                           title=f"validation loss of dense and MoD, {setting}")
    paths = [os.path.join(folder, "loss_curves.png"), os.path.join(folder, "routing_map.png")]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    torch.manual_seed(1337)
    start = torch.tensor([[tokenizer.newline_or_eot]], device=device)
    ids = model.generate(start, cfg.block_size - 1, temperature=0.8, top_k=200)  # (1, block_size)
    fig = plot_routing_map(model, tokenizer, ids, title=f"the tokens each routed block processes in a sample of the "
                                                        f"MoD model ({setting})")
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    for path in paths:
        print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KB)", file=sys.stderr)

    # the numbers of the captions: final losses, and the predictor against top-k on the sample and on validation text
    for label, result in results.items():
        ev = result["eval"]
        causal = f", {ev['val_predictor']:.4f} causal" if "val_predictor" in ev else ""
        print(f"figures: {label} val loss {ev['val_topk']:.4f} top-k{causal} after {result['iter_num']} iterations, "
              f"{result['history'][-1]['time_s']:.0f} s of training", file=sys.stderr)
    windows = val_windows(settings.get("data_dir") or dataset_dir(dataset), cfg.block_size, 256)[:, 1:]
    with torch.no_grad():
        for (block, topk, pred), on_val in zip(routing_rows(model, ids),
                                               sample.topk_agreement(model, windows.to(device), "predictor")):
            both = (topk & pred).sum().item()
            print(f"figures: block {block} predictor vs top-k: on the sample precision {both}/{pred.sum().item()}, "
                  f"recall {both}/{topk.sum().item()}; on {windows.numel():,} validation tokens precision "
                  f"{on_val['precision']:.1%}, recall {on_val['recall']:.1%}, balanced accuracy "
                  f"{on_val['balanced']:.1%}, routes {on_val['routed']:.1%}",
                  file=sys.stderr)
    return paths


def machine(device):
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


def check_args(args, device):
    """Every argument, before the benchmark runs (it takes minutes): one ConfigError that says what to do."""
    for name in ("repeats", "quality_iters", "eval_iters"):
        require(getattr(args, name) >= 1, f"--{name} must be >= 1, got {getattr(args, name)}")
    require(args.dtype in ("auto", "float32") or device.startswith("cuda"),
            "--dtype bfloat16/float16 is for CUDA GPUs; leave it out on a CPU")
    unknown = set(args.shapes.split(",")) - SHAPES.keys()
    require(not unknown, f"unknown shape(s) {sorted(unknown)}: choose from {', '.join(SHAPES)}")
    require(args.out, "--out is empty: name the markdown file to write, e.g. --out=bench.md")
    require(not os.path.isdir(args.out), f"--out={args.out} is a folder: name a file, e.g. "
                                         f"--out={os.path.join(args.out, 'bench.md')}")
    folder = os.path.dirname(os.path.abspath(args.out))
    require(os.path.isdir(folder), f"--out={args.out}: there is no folder {folder}; create it or choose another --out")
    try:
        check_writable(folder)
    except OSError as e:
        raise ConfigError(f"--out={args.out}: cannot write to {folder} ({e.strerror}); choose another --out") from None


def main(argv):
    p = ArgumentParser(prog="bench.py", description="Dense vs MoD, side by side (see the top of bench.py).")
    p.add_argument("--device", default="", help="cpu or cuda (default: the best available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: what train.py picks (bf16, or fp16 on older GPUs; float32 on a CPU)")
    p.add_argument("--compile", default="auto", nargs="?", const="yes", choices=["auto", "yes", "no", "both"],
                   help="torch.compile the training step: yes, no, or both side by side (auto: both on a GPU, where "
                        "train.py compiles by default, no on a CPU)")
    p.add_argument("--repeats", type=int, default=5, help="repeats per measurement (the median is reported)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from: {', '.join(SHAPES)} (cpu: "
                   "nanoGPT's laptop shape, 4 x 128, block 64; shakespeare_char: its GPU shape, 6 x 384, block 256)")
    p.add_argument("--quality", action="store_true", help="also run the quality trainings (~25 minutes on a CPU)")
    p.add_argument("--quality_iters", type=int, default=2000)
    p.add_argument("--eval_iters", type=int, default=200)
    p.add_argument("--out", default="bench.md", help="where to write the markdown (default: bench.md)")
    p.add_argument("--figures", action="store_true", help="only draw the README's pictures into figures/ (minutes)")

    def bench():
        args = p.parse_args(argv)
        device = pick_device(args.device)
        check_args(args, device)
        if args.figures:  # the pictures alone: no speed measurement, no markdown
            figures(device)
        else:
            run(args, argv, device)
    run_cli(bench, on_interrupt="stopped: nothing written to --out")


def run(args, argv, device):
    dtype = pick_dtype(args.dtype, device)
    compile_ = args.compile if args.compile != "auto" else "both" if device.startswith("cuda") else "no"
    modes = {"no": ["eager"], "yes": ["compiled"], "both": ["eager", "compiled"]}[compile_]
    lines = [f"## bench.py on {machine(device)}", "",
             f"`python bench.py {' '.join(argv)}`".replace(" `", "`"), "",
             f"dtype {dtype}, training step {' and '.join(modes)}, median of {args.repeats} interleaved repeats; MoD: "
             f"capacity 12.5%, every other block routed.", ""]
    for name in args.shapes.split(","):
        print(f"speed: {name} ...", file=sys.stderr)
        lines += speed(name, SHAPES[name], device, dtype, modes, args.repeats)
    if args.quality:
        print("quality: training ...", file=sys.stderr)
        log_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)), "bench_runs")
        os.makedirs(log_dir, exist_ok=True)
        lines += quality(device, log_dir, args.quality_iters, args.eval_iters)
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
