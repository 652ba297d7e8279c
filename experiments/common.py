"""
What the experiments share: a command line, the data, one training measured on fixed validation windows (bench.py's
quality_run, which trains with train.main), the seed statistics, and writing results. Each experiment script asks one
question; this file holds nothing about MoD itself.
"""

import argparse
import json
import math
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from anywhere: train.py, mod.py and bench.py live one folder up

import bench  # noqa: E402
import train  # noqa: E402
from data.prepare import dataset_dir, load_dataset, prepare_if_missing  # noqa: E402
from mod import MoDConfig, MoDGPT  # noqa: E402

# the quality benchmark's settings (bench.py --quality): the CPU default's model at two sequence lengths
SETTINGS = bench.QUALITY_SETTINGS


def command_line(doc, **defaults):
    """Parse --key=value flags for the keys of defaults (their types from the defaults); returns a dict."""
    parser = argparse.ArgumentParser(description=doc.strip().split("\n\n")[0])
    for key, default in defaults.items():
        parser.add_argument(f"--{key}", type=type(default), default=default)
    return vars(parser.parse_args())


def data_folder(data_dir=""):
    """shakespeare_char's folder (prepared on first use), or data_dir, checked."""
    if not data_dir:
        data_dir = dataset_dir("shakespeare_char")
        prepare_if_missing("shakespeare_char", data_dir, 256)
    load_dataset(data_dir, "shakespeare_char", 16)
    return data_dir


def flops(shape, **fields):
    """Forward FLOPs of one sequence (top-k routing) of the model shape + fields."""
    return MoDGPT(MoDConfig(**{**shape, **fields})).estimate_flops(shape["block_size"])["total"]


def params(shape, **fields):
    return MoDGPT(MoDConfig(**{**shape, **fields})).get_num_params()


def train_settings(shape, batch_size, iters, eval_iters, device="cpu", data_dir="", **fields):
    """train.main's settings for one run of `iters` iterations with the cosine schedule over all of them; train.py's
    own evaluation only at the end (a glance: the experiment measures on its own windows)."""
    return dict(shape, device=device, batch_size=batch_size, max_iters=iters, lr_decay_iters=iters,
                eval_interval=iters, eval_iters=eval_iters, log_interval=max(1, iters // 10), data_dir=data_dir,
                **fields)


def measure(label, log_dir, windows, settings, causal=True):
    """Train one model (bench.quality_run: train.main, then per-window losses on `windows`), and return what the
    experiments compare: losses per window (top-k; causal for a routed model), the predictor's scores per routed
    block on causal inputs, ms per iteration, wall seconds."""
    routed = settings.get("mod_every", 2) > 0
    run = bench.quality_run(label, log_dir, windows, ("predictor",) if routed and causal else (), **settings)
    out = dict(label=label, topk=run["losses"]["topk"], ms_per_iter=run["result"]["ms_per_iter"], wall=run["wall"],
               iters=run["result"]["iter_num"])
    if "predictor" in run["losses"]:
        out["causal"] = run["losses"]["predictor"]
        out["scores"] = run["accuracy"]["predictor", "predictor"]
        out["routed"] = run["routed"]["predictor"]
    return out


def paired(a, b):
    """Mean loss of a minus b over the same windows (a, b: (N, T) losses), and its standard error over the text."""
    return bench.mean_se(a.mean(1) - b.mean(1))


# Student's t at 95% (two-sided) for n - 1 degrees of freedom: with 3 seeds the mean must be 4.3 standard errors
# from 0, not 2 (a normal's 1.96 assumes many seeds)
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def over_seeds(values):
    """mean, standard deviation across seeds (0 for one seed) and a verdict: a difference "holds" when the 95%
    t-interval of its mean across seeds excludes 0 (mean over T95 standard errors, sd / sqrt(n)). Each seed's value
    carries its own evaluation noise, so the spread holds both kinds of noise."""
    n, mean = len(values), statistics.fmean(values)
    sd = statistics.stdev(values) if n > 1 else 0.0
    if n == 1:
        return mean, sd, "one seed"
    return mean, sd, "holds" if abs(mean) > T95.get(n - 1, 2.0) * sd / math.sqrt(n) else "within the noise"


def write(out_dir, name, lines, data):
    """out_dir/<name>.md (the tables) and out_dir/<name>.json (the numbers); prints the tables."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1)
    print("\n".join(lines))


def pyplot():
    """matplotlib's pyplot for files only (no window), or None when matplotlib is missing (plots are optional)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
