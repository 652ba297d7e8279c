"""
Train a Mixture-of-Depths model (or the dense baseline) on Shakespeare, characters or GPT-2 BPE.

    python train.py                           # the whole job: prepare data, train, evaluate, save, print a sample
    python train.py --help                    # every setting, with its type, default and meaning
    python train.py --mod_every=0             # the dense baseline, same everything else
    python train.py --dataset=shakespeare --max_iters=500 --compile=True
    python train.py --init_from=resume        # continue out_dir/ckpt.pt exactly where it stopped
    torchrun --standalone --nproc_per_node=2 train.py --gradient_accumulation_steps=2   # DDP, 2 GPUs or processes

From Python (a notebook cell), the same training:

    import train
    result = train.main(dataset="shakespeare_char", max_iters=200)

Every field of TrainConfig and of mod.MoDConfig can be set as --key=value (or --key value, or a keyword of main()).
Defaults follow the device: nanoGPT's shakespeare_char setting on a GPU, its laptop setting on a CPU.

Checkpoints: out_dir/ckpt.pt is the latest state (written at every evaluation and when a run is stopped), the one
--init_from=resume continues; out_dir/best.pt is the model with the lowest validation loss so far, the one sample.py
loads. Neither is ever written with NaN/inf weights, best.pt never with a worse model, and a scratch run refuses to
replace either (--overwrite=True allows it). The first Ctrl-C or SIGTERM finishes the current iteration, saves ckpt.pt
and stops; a second stops at once, but never in the middle of a save. Exit status: 0 done, 1 an error (one line on
stderr), 130 stopped by Ctrl-C (SIGINT), 143 stopped by SIGTERM.
"""

import argparse
import dataclasses
import difflib
import inspect
import json
import math
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields

import numpy as np
import torch

import data.prepare
from data.prepare import DataError, Tokenizer, check_token_files, load_meta, meta_problem, prepare, prepare_command
from mod import MoDConfig, MoDGPT

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class TrainConfig:
    """Every setting of a training run but the model's (those are mod.MoDConfig's). The comment beside each field is
    its meaning, which `python train.py --help` shows; a comment on a line of its own starts a group."""
    # I/O
    dataset: str = "shakespeare_char"  # shakespeare_char (a token per character) or shakespeare (GPT-2 BPE)
    data_dir: str = ""  # folder of train.bin, val.bin, meta.json; "" is data/<dataset>, prepared when empty
    out_dir: str = "out"  # folder of the checkpoints: ckpt.pt (latest, to resume) and best.pt (best val loss)
    init_from: str = "scratch"  # scratch (a new model) or resume (continue out_dir/ckpt.pt exactly)
    overwrite: bool = False  # True: a scratch run may replace the checkpoints of an earlier run in out_dir
    eval_interval: int = 250  # evaluate and save a checkpoint every this many iterations
    eval_iters: int = 200  # batches per evaluation
    log_interval: int = 10  # print the training loss every this many iterations
    eval_only: bool = False  # evaluate once and stop, writing nothing (with --init_from=resume: the checkpoint)
    sample_tokens: int = 300  # length of the sample printed at the end (0: none)
    # data and optimisation
    batch_size: int = 64  # sequences per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per iteration, in total over all DDP processes
    max_iters: int = 5000  # iterations to train for
    learning_rate: float = 1e-3  # peak learning rate of AdamW
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_iters: int = 100  # linear warm-up to learning_rate over this many iterations
    lr_decay_iters: int = 5000  # cosine decay from learning_rate to min_lr over this many iterations
    decay_lr: bool = True  # False: learning_rate all along, no warm-up or decay
    weight_decay: float = 0.1  # AdamW weight decay, on weight matrices only
    beta1: float = 0.9  # AdamW's beta1, in [0, 1)
    beta2: float = 0.99  # AdamW's beta2, in [0, 1)
    grad_clip: float = 1.0  # clip the gradient norm to this (0: no clipping)
    # system
    device: str = ""  # cpu, cuda, cuda:N or mps; "" picks cuda, then mps, then cpu
    dtype: str = "auto"  # float32, bfloat16 or float16 (with a GradScaler); auto: bf16/fp16 on a GPU, fp32 on CPU
    compile: bool = False  # torch.compile the model (worth it on a GPU)
    peak_tflops: float = 0.0  # the device's peak, for MFU; 0 means look it up (known GPUs) or print no MFU
    seed: int = 1337  # random seed of the initialisation, the batches and dropout


# nanoGPT's settings for shakespeare_char: config/train_shakespeare_char.py on a GPU, its README's laptop line on a CPU
GPU_DEFAULTS = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64,
                    max_iters=5000, lr_decay_iters=5000, eval_interval=250, eval_iters=200, log_interval=10)
CPU_DEFAULTS = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, batch_size=12,
                    max_iters=2000, lr_decay_iters=2000, eval_interval=250, eval_iters=20, log_interval=1)
# dense bf16 (float16 for V100 and T4) tensor-core peaks, for MFU; matched as whole words of the GPU's name
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10": 125.0,
               "V100": 125.0, "T4": 65.0}


class ConfigError(ValueError):
    """A bad setting: the message says which and what to do."""


# -----------------------------------------------------------------------------
# the command line: one flag per field of TrainConfig and MoDConfig, explained by the comment beside the field


class ArgumentParser(data.prepare.ArgumentParser):
    """The one argument parser of the project (see data/prepare.py: one line per bad flag, no flag twice, no
    abbreviations, "did you mean"), here raising ConfigError: a bad setting."""

    error_class = ConfigError


def setting_groups(config_class):
    """[(title, [(field, meaning), ...]), ...] read from a config class's source. The comment beside each field is
    its meaning, so it is written in one place only; a comment on a line of its own ("# I/O") starts a group."""
    groups = [("", [])]
    for line in inspect.getsource(config_class).splitlines():
        heading = re.fullmatch(r"    # -*\s*(.+?)\s*-*", line)  # "    # I/O" or "    # --- Mixture-of-Depths ---"
        field = re.fullmatch(r"    (\w+): \w+ = .+?(?:  # (.+))?", line)  # "    name: type = default  # meaning"
        if heading:
            groups.append((heading.group(1), []))
        elif field:
            name, comment = field.groups()
            groups[-1][1].append((name, comment or ""))
    return [(title, entries) for title, entries in groups if entries]


def default_text(name, default):
    """A setting's default as --help shows it: the device presets below override the dataclasses' defaults."""
    on_gpu, on_cpu = GPU_DEFAULTS.get(name, default), CPU_DEFAULTS.get(name, default)
    show = [f'"{v}"' if v == "" else str(v) for v in (on_gpu, on_cpu)]
    return show[0] if on_gpu == on_cpu else f"{show[0]} on a GPU, {show[1]} on a CPU"


def make_parser():
    """The command line of train.py: a flag per field of TrainConfig and MoDConfig, grouped and explained as in
    their source (setting_groups)."""
    parser = ArgumentParser(
        prog="train.py", usage="python train.py [--key=value ...]",
        listing="the settings are the fields of TrainConfig in train.py and MoDConfig in mod.py",
        description="Train a Mixture-of-Depths model (or the dense baseline) on Shakespeare. Every setting below is "
                    "--key=value (or --key value; a bool alone, --compile, means True) and also a keyword of "
                    "train.main(). Defaults follow the device: nanoGPT's shakespeare_char setting on a GPU, its "
                    "laptop setting on a CPU.",
        epilog="Checkpoints: out_dir/ckpt.pt is the latest state (--init_from=resume continues it), out_dir/best.pt "
               "the lowest validation loss (sample.py loads it). Ctrl-C or SIGTERM: finish the iteration, save "
               "ckpt.pt, stop. Exit status: 0 done, 1 error, 130 Ctrl-C, 143 SIGTERM.")
    for config, where in ((TrainConfig, "TrainConfig"), (MoDConfig, "MoDConfig in mod.py")):
        field_of = {f.name: f for f in fields(config)}
        for title, entries in setting_groups(config):
            group = parser.add_argument_group(f"{title or 'model'} ({where})")
            for name, meaning in entries:
                kind = field_of[name].type
                default = default_text(name, field_of[name].default)
                if name == "vocab_size":
                    meaning, default = "comes from the data's meta.json: not set by hand", "from the data"
                bool_alone = dict(nargs="?", const="True") if kind is bool else {}  # --compile is --compile=True
                group.add_argument(f"--{name}", metavar=kind.__name__, default=argparse.SUPPRESS, **bool_alone,
                                   help=f"{meaning} (default: {default})".replace("%", "%%"))
    return parser


# -----------------------------------------------------------------------------
# configuration: defaults <- device preset <- checkpoint (resume) <- what the user asked for


def parse_args(argv):
    """['--key=value', ...] or ['--key', 'value', ...] -> {key: value as a string}, checked against the fields."""
    return vars(make_parser().parse_args(argv))


def field_types():
    """Every setting's name -> its type, from TrainConfig and MoDConfig."""
    return {f.name: f.type for config in (MoDConfig, TrainConfig) for f in fields(config)}


def convert(key, value, kind):
    """Convert one setting to its field's type; strings from the command line are parsed, others checked."""
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)  # --dropout=0 is fine
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and not math.isfinite(number):  # float("inf") and float("nan") parse
            raise ConfigError(f"--{key} must be a finite number, got {value!r}")
        if number is not None:
            return number
    elif kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"--{key} expects {kind.__name__}, got {value!r}")


def resolve_config(overrides, device_type, checkpoint_config=None):
    """Return (TrainConfig, MoDConfig) from the layers of settings, with one clear error for anything wrong."""
    types = field_types()
    for key in overrides:
        if key not in types:
            close = difflib.get_close_matches(key, types, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise ConfigError(f"unknown setting --{key}{hint}; the settings are the fields of TrainConfig "
                              f"in train.py and MoDConfig in mod.py")
    asked = {k: convert(k, v, types[k]) for k, v in overrides.items()}
    if checkpoint_config is None and "vocab_size" in asked:
        raise ConfigError(f"--vocab_size={asked['vocab_size']} cannot be set: the vocabulary comes from the data "
                          f"(its meta.json), so drop --vocab_size")
    settings = dict(GPU_DEFAULTS if device_type == "cuda" else CPU_DEFAULTS)
    if checkpoint_config is not None:
        settings.update(checkpoint_config)
        model_fields = {f.name for f in fields(MoDConfig)} - {"dropout"}
        for k in sorted(model_fields & asked.keys()):
            trained = checkpoint_config.get(k)
            if asked[k] != trained:
                raise ConfigError(f"the checkpoint was trained with {k}={trained!r}, not {asked[k]!r}: "
                                  f"drop --{k} to resume, or train from scratch into another --out_dir")
    settings.update(asked)
    train_cfg = TrainConfig(**{f.name: settings[f.name] for f in fields(TrainConfig) if f.name in settings})
    model_cfg = {f.name: settings[f.name] for f in fields(MoDConfig) if f.name in settings}
    return train_cfg, model_cfg


def check_train_config(cfg):
    def need(ok, message):
        if not ok:
            raise ConfigError(message)
    need(cfg.dataset in ("shakespeare_char", "shakespeare"),
         f"--dataset must be shakespeare_char or shakespeare, got {cfg.dataset!r}")
    need(cfg.init_from in ("scratch", "resume"), f"--init_from must be scratch or resume, got {cfg.init_from!r}")
    need(cfg.dtype in ("auto", "float32", "bfloat16", "float16"),
         f"--dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")
    for name in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval"):
        need(getattr(cfg, name) >= 1, f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("max_iters", "warmup_iters", "lr_decay_iters", "sample_tokens"):
        need(getattr(cfg, name) >= 0, f"--{name} must be >= 0, got {getattr(cfg, name)}")
    need(cfg.learning_rate > 0 and 0 <= cfg.min_lr <= cfg.learning_rate,
         f"need 0 <= min_lr <= learning_rate and learning_rate > 0, got {cfg.min_lr} and {cfg.learning_rate}")
    for name in ("beta1", "beta2"):
        need(0 <= getattr(cfg, name) < 1, f"--{name} must be in [0, 1) (AdamW's moving averages; the usual values "
                                           f"are 0.9 and 0.99), got {getattr(cfg, name)}")
    need(cfg.grad_clip >= 0 and cfg.weight_decay >= 0, "--grad_clip and --weight_decay must be >= 0")
    need(cfg.peak_tflops >= 0, f"--peak_tflops must be >= 0 (0: look it up), got {cfg.peak_tflops}")
    need(0 <= cfg.seed < 2**63, f"--seed must be in [0, 2**63), got {cfg.seed}")


def pick_device(requested):
    if requested:
        if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", requested):
            raise ConfigError(f"--device={requested} is not a device: use cpu, cuda, cuda:N or mps (or leave it out)")
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device={requested} but no CUDA GPU is visible: use --device=cpu (or leave it out)")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("--device=mps but MPS is not available here: use --device=cpu (or leave it out)")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def setup_device(requested):
    """The device to train on, and whether this is one of several DDP processes started by torchrun, with its rank
    and the number of processes."""
    device = pick_device(requested)
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world_size = 0, 1
    if ddp:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per process
        torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if ":" in device:  # "cuda:1": make it the current GPU, so capability, name and autocast refer to it
        torch.cuda.set_device(device)
    return device, ddp, rank, world_size


def pick_dtype(requested, device):
    """Mixed precision where it helps and is safe: bf16 needs compute capability >= 8.0 (A100, H100, L4, ...);
    older GPUs (Colab's T4) get float16 with a GradScaler; CPU and MPS train in float32. bfloat16 and float16 can
    be asked for on a CPU too (CPU autocast: rarely faster, but the mixed-precision path runs, and is tested, there)."""
    if not device.startswith("cuda"):
        if requested in ("auto", "float32"):
            return "float32"
        if device == "mps":
            raise ConfigError(f"--dtype={requested} is for CUDA GPUs and CPUs; on mps use --dtype=float32 (or auto)")
        return requested
    bf16_ok = torch.cuda.get_device_capability()[0] >= 8
    if requested == "auto":
        return "bfloat16" if bf16_ok else "float16"
    if requested == "bfloat16" and not bf16_ok:
        raise ConfigError("this GPU has no fast bfloat16 (compute capability < 8.0): use --dtype=float16 or auto")
    return requested


# -----------------------------------------------------------------------------
# data: random windows of the token stream, as nanoGPT


class Batches:
    """Random (x, y) windows from train.bin / val.bin. The windows of iteration `it` come from a generator seeded
    by (seed, rank, it), so a resumed run sees exactly the batches an uninterrupted run would have seen."""

    def __init__(self, data_dir, block_size, batch_size, device, seed, rank):
        self.data_dir, self.block_size, self.batch_size = data_dir, block_size, batch_size
        self.device, self.seed, self.rank = device, seed, rank

    def get(self, split, generator):
        # re-open the memmap every batch to avoid a memory leak (see nanoGPT's train.py)
        data = np.memmap(os.path.join(self.data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - self.block_size, (self.batch_size,), generator=generator)
        x = torch.stack([torch.from_numpy(data[i:i + self.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + self.block_size].astype(np.int64)) for i in ix])
        if self.device.startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def for_iteration(self, it):
        return torch.Generator().manual_seed(hash((self.seed, self.rank, it)))

    def for_eval(self):
        return torch.Generator().manual_seed(self.seed)  # the same eval batches every time: comparable curves


def prepare_data(cfg, block_size, is_master, ddp):
    """The data folder and its meta dict. The default folder, data/<dataset>, is prepared when it holds none of
    train.bin, val.bin and meta.json; a folder holding only some of them is an error (never prepared over: they may
    come from the user's own text). The token files are checked here, once, so the training step need not check
    its batches."""
    data_dir = cfg.data_dir or os.path.join(HERE, "data", cfg.dataset)
    if is_master:  # the other DDP processes wait at the barrier below
        names = ("train.bin", "val.bin", "meta.json")
        present = [name for name in names if os.path.exists(os.path.join(data_dir, name))]
        run = prepare_command(data_dir, cfg.dataset)
        if not present and cfg.data_dir:
            raise ConfigError(f"--data_dir={cfg.data_dir} holds no train.bin/val.bin/meta.json: prepare it with "
                              f"{run} (add --input=PATH for your own text)")
        if not present:
            print(f"preparing {cfg.dataset} in {data_dir} ...")
            prepare(cfg.dataset, out_dir=data_dir, min_tokens=block_size)  # checks the text before writing
        elif len(present) < len(names):
            missing = [name for name in names if name not in present]
            raise DataError(f"{data_dir} holds {' and '.join(present)} but no {' or '.join(missing)}: a partial "
                            f"dataset, which train.py will not prepare over; prepare it again with {run} (it "
                            f"rewrites all three files; --input=PATH for your own text)")
    if ddp:
        torch.distributed.barrier()
    meta = load_meta(data_dir, cfg.dataset)
    check_token_files(data_dir, meta, block_size)
    return data_dir, meta


def vocabulary(meta):
    """What says which token is which: the characters of a char dataset, or the name of a BPE encoding."""
    return meta.get("chars") if meta["tokenizer"] == "char" else meta.get("encoding")


# -----------------------------------------------------------------------------
# optimiser, schedule, checkpoints


def configure_optimizer(model, cfg, device_type):
    """AdamW with weight decay on matrices (Linear and embedding weights) only, not on biases and LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    # fused: one kernel updates every parameter, instead of about ten small operations per parameter tensor; on a
    # CPU (torch >= 2.4) that is ~10% of a training step at the laptop shape
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device_type in ("cuda", "cpu"))


def get_lr(it, cfg):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (nanoGPT's schedule)."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a crash or Ctrl-C mid-write never destroys the last good checkpoint.
    The temporary name is unique (process id and random digits), so two runs saving into one out_dir never write
    into, rename or delete each other's file."""
    tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk is a RuntimeError from inside torch.save
        raise ConfigError(f"cannot write {path} ({first_reason(e)}): free some disk space or choose another "
                          f"--out_dir; the previous {os.path.basename(path)} is untouched") from None
    finally:
        if os.path.exists(tmp):  # the write failed: leave no half-written file behind
            os.remove(tmp)


# what train.py needs to resume; sample.py needs only the model, its config and the meta
RESUME_KEYS = ("model", "optimizer", "scaler", "model_config", "train_config", "meta", "iter_num", "best_val_loss",
               "rng_state")


def load_checkpoint(path, need=RESUME_KEYS):
    """A checkpoint written by train.py, checked: one ConfigError naming the file and what to do if it cannot be read,
    lacks something we need, or holds NaN/inf weights. torch.load(weights_only=True) reads tensors and plain data
    only: it never runs code stored in the file (a pickle can otherwise run anything)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror}): check the path and its permissions") from None
    except Exception as e:
        raise ConfigError(f"{path} is not a readable checkpoint ({type(e).__name__}): it may be corrupt or from "
                          f"another program; delete it or train into another --out_dir") from None
    missing = [key for key in need if key not in ckpt] if isinstance(ckpt, dict) else list(need)
    if missing:
        raise ConfigError(f"{path} is not a checkpoint of this train.py (missing {missing}): "
                          f"train into another --out_dir")
    damaged = [key for key in ("model", "model_config", "train_config", "meta", "rng_state")
               if key in need and not isinstance(ckpt[key], dict)]
    if damaged:
        raise ConfigError(f"{path} is damaged ({damaged[0]} is no dict): train into another --out_dir")
    problem = meta_problem(ckpt["meta"]) if "meta" in need else None
    if problem:
        raise ConfigError(f"the meta of {path} {problem}: the file is damaged; train into another --out_dir")
    for name, tensor in ckpt["model"].items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ConfigError(f"{path} holds non-finite weights (NaN or inf, in {name}): it cannot be used; "
                              f"use the other checkpoint in its folder (ckpt.pt or best.pt) or train again")
    return ckpt


def first_reason(error):
    """The line of an exception's message that says what went wrong (load_state_dict's first line only says that
    something did)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]


def weights_are_finite(model):
    """No NaN or inf in any weight or buffer. Reads every tensor (a sync on a GPU): called only before a save."""
    return all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


def peak_flops(cfg, device):
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS.items():
            if re.search(rf"\b{key}\b", name):  # "NVIDIA A100-SXM4-80GB" is an A100; "NVIDIA A10G" is no A10
                return tflops * 1e12
    return None  # unknown (CPU, MPS, other GPUs): no MFU unless --peak_tflops is given


# -----------------------------------------------------------------------------
# training


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (sent by `timeout`, job schedulers, a notebook's shutdown) while training.

    The first one only raises a flag: the loop finishes the current iteration, saves ckpt.pt and stops, so the
    checkpoint never holds half an iteration and a resume continues exactly. A second one stops at once, without
    saving, except in the middle of a save: a save in progress always finishes first (a half-written file would be
    thrown away, and with it everything since the last save). Single process only: under DDP every process gets the
    signal at its own time, so there the usual behaviour stays."""

    def __init__(self):
        self.received = None  # the first signal's name ("SIGINT" or "SIGTERM"), once one has come
        self.saving = False
        self.again = False  # a second signal came during a save
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handler)
        return self

    def handler(self, signum, frame):  # only sets flags: printing here could collide with the loop's printing
        if self.received is None:
            self.received = signal.Signals(signum).name
        elif self.saving:
            self.again = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def save_in_progress(self):
        """Signals during the save are held back; a second one then stops at once, after the save."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False
        if self.again:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)


def read_metrics(path):
    """The records of a metrics.jsonl file (see Metrics), one dict per log line or evaluation. A line cut short by a
    crash is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


class Metrics:
    """The run's history for plotting: every log line and every evaluation as one dict (main() returns the list),
    also written as a line of JSON to out_dir/metrics.jsonl. time_s is training time, evaluations and saving
    excluded (the fair clock for comparing models); wall_s is all of it.

    A run from scratch starts a fresh file. A resumed run keeps the lines up to its checkpoint's iteration (later
    ones came from iterations it does again), continues both clocks from the last line it kept, and appends. An
    evaluation of an iteration already recorded (a resume evaluates its first iteration again) replaces the old one.
    Only the master process writes; the others keep an empty history. write=False keeps the history in memory and
    never touches the file (an evaluation-only run writes nothing)."""

    def __init__(self, path, resume_iter=None, enabled=True, write=True):
        self.path, self.enabled, self.write, self.history = path, enabled, write, []
        if not enabled:
            return
        if resume_iter is not None and os.path.exists(path):
            self.history = [r for r in read_metrics(path) if r.get("iter", math.inf) <= resume_iter]
        last = self.history[-1] if self.history else {}
        self.time_offset, self.wall_offset = last.get("time_s", 0.0), last.get("wall_s", 0.0)
        self.rewrite()

    def rewrite(self):
        if not self.write:
            return
        # write and rename, as the checkpoint: a crash leaves the old file whole; a name of our own, so that another
        # run in the same out_dir never renames our half-written file
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.history)
        os.replace(tmp, self.path)

    def add(self, kind, it, train_s, wall_s, **values):
        """One record: kind "train" (a log line) or "eval"; train_s and wall_s are this process's seconds so far."""
        if not self.enabled:
            return
        record = dict(kind=kind, iter=it, time_s=round(self.time_offset + train_s, 3),
                      wall_s=round(self.wall_offset + wall_s, 3), **values)
        if kind == "eval":  # the same evaluation again (a resume's first one): the newer one replaces it
            same = [i for i, r in enumerate(self.history) if r.get("kind") == "eval" and r.get("iter") == it]
            if same:
                self.history[same[0]] = record
                self.rewrite()
                return
        self.history.append(record)
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


@contextmanager
def stop_on_bad_loss(ckpt_path):
    """A NaN/inf loss stops training with one message, before anything is saved."""
    try:
        yield
    except FloatingPointError as e:
        raise SystemExit(f"stopping: {e}. The last good checkpoint (if any) is untouched in {ckpt_path}; "
                         f"try a lower --learning_rate or --dtype=float32") from None


@torch.no_grad()
def evaluate(model, batches, cfg, autocast):
    """LM loss on train and val under top-k routing, val loss under causal predictor routing (the number that holds
    when sampling), and the predictor's accuracy against top-k. The same batches every time."""
    model.eval()
    routed = bool(model.config.routed_blocks())
    out = {}
    for split, routing in [("train", "topk"), ("val", "topk")] + ([("val", "predictor")] if routed else []):
        generator = batches.for_eval()
        losses, accs = [], []
        for _ in range(cfg.eval_iters):
            x, y = batches.get(split, generator)
            with autocast:
                model(x, y, routing=routing, check_input=False)
            losses.append(model.last_stats["lm_loss"].item())
            accs.append(model.last_stats["predictor_acc"].item())
        out[f"{split}_{routing}"] = sum(losses) / len(losses)
        if split == "val" and routing == "topk" and routed:
            out["predictor_acc"] = sum(accs) / len(accs)
    model.train()
    return out


def format_eval(it, ev):
    line = f"step {it}: train loss {ev['train_topk']:.4f}, val loss {ev['val_topk']:.4f}"
    if "val_predictor" in ev:
        line += (f" (top-k), val loss {ev['val_predictor']:.4f} (causal predictor), "
                 f"predictor accuracy {100 * ev['predictor_acc']:.1f}%")
    return line


def main(*configs, **overrides):
    """Train. Settings come as keywords, main(max_iters=200, mod_every=0), which go on top of the device's preset;
    or as whole TrainConfig / MoDConfig objects or dicts, main(TrainConfig(max_iters=200), MoDConfig(n_layer=4)),
    whose every field counts (the dataclasses' defaults are nanoGPT's GPU setting) except a MoDConfig's vocab_size,
    which always comes from the data; keywords win over both. A bad setting raises ConfigError (a ValueError), bad
    data DataError, a NaN/inf loss SystemExit, each with a message that says what to do.
    Returns a dict with the last evaluation, the iteration reached, the checkpoint paths, timings and the history
    (every log line and evaluation as a dict, as written to out_dir/metrics.jsonl: see Metrics). When Ctrl-C or
    SIGTERM stopped training it returns too, with interrupted=True and signal="SIGINT" or "SIGTERM" (the command
    line then exits with 130 or 143); a second Ctrl-C raises KeyboardInterrupt."""
    settings = {}
    for config in configs:
        if isinstance(config, dict):
            settings.update(config)
        elif isinstance(config, (TrainConfig, MoDConfig)):
            fields_of = dataclasses.asdict(config)
            if isinstance(config, MoDConfig):
                del fields_of["vocab_size"]  # the data decides it
            settings.update(fields_of)
        else:
            raise ConfigError(f"main() takes TrainConfig or MoDConfig objects or dicts, and keywords; "
                              f"got a {type(config).__name__}")
    settings.update(overrides)

    device, ddp, rank, world_size = setup_device(str(settings.get("device", "")))
    is_master = rank == 0
    device_type = "cuda" if device.startswith("cuda") else device
    try:
        result = _train(settings, device, device_type, ddp, rank, world_size, is_master)
    except BaseException:
        if ddp:
            torch.distributed.destroy_process_group()
        raise
    if ddp:  # wait for every process (rank 0 evaluates and saves last) before tearing the group down
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


def check_writable(folder):
    """Create and delete a file in folder, as a save will: an OSError if we cannot. (os.access only guesses from the
    permission bits, which e.g. root or some network filesystems do not follow.)"""
    probe = os.path.join(folder, f".write-test.{os.getpid()}")
    with open(probe, "wb"):
        pass
    os.remove(probe)


def check_out_dir(cfg, ckpt_path, best_path):
    """Before any work: out_dir must be a folder we can write to, and a scratch run must not replace the checkpoints
    of an earlier run unless asked to (--overwrite=True). An evaluation-only run writes nothing: no checks."""
    if cfg.eval_only:
        return
    found = [os.path.basename(path) for path in (ckpt_path, best_path) if os.path.exists(path)]
    if cfg.init_from == "scratch" and found and not cfg.overwrite:
        raise ConfigError(f"{cfg.out_dir} already holds {' and '.join(found)} of an earlier run, which a new run "
                          f"would replace: continue it with --init_from=resume, train into another --out_dir, or "
                          f"start over with --overwrite=True")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        check_writable(cfg.out_dir)
    except OSError as e:
        raise ConfigError(f"cannot write to --out_dir={cfg.out_dir} ({e.strerror}): choose a folder you can "
                          f"write to") from None


def _train(settings, device, device_type, ddp, rank, world_size, is_master):
    out_dir = str(settings.get("out_dir", TrainConfig.out_dir))
    if not out_dir:
        raise ConfigError("--out_dir is empty: name a folder for the checkpoints, e.g. --out_dir=out")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out_dir={out_dir} is a file, not a folder: choose another --out_dir")
    ckpt_path = os.path.join(out_dir, "ckpt.pt")  # the latest state: what --init_from=resume continues
    best_path = os.path.join(out_dir, "best.pt")  # the lowest validation loss so far: what sample.py loads
    ckpt = None
    if str(settings.get("init_from", "scratch")) == "resume":
        if not os.path.exists(ckpt_path):
            raise ConfigError(f"--init_from=resume but there is no checkpoint at {ckpt_path}: "
                              f"train one first (python train.py --out_dir={out_dir})")
        ckpt = load_checkpoint(ckpt_path)
        checkpoint_config = {**ckpt["train_config"], **ckpt["model_config"], "init_from": "resume",
                             "out_dir": out_dir}
        cfg, model_fields = resolve_config(settings, device_type, checkpoint_config)
    else:
        cfg, model_fields = resolve_config(settings, device_type)
    cfg.device = device
    check_train_config(cfg)
    if cfg.gradient_accumulation_steps % world_size:
        raise ConfigError(f"--gradient_accumulation_steps={cfg.gradient_accumulation_steps} is the total over all "
                          f"processes and must be a multiple of their number ({world_size}): e.g. "
                          f"--gradient_accumulation_steps={world_size}")
    accum_steps = cfg.gradient_accumulation_steps // world_size
    dtype = pick_dtype(cfg.dtype, device)
    model_cfg = MoDConfig(**model_fields)  # checks the model settings (ValueError with the fix) before any work
    if is_master:
        check_out_dir(cfg, ckpt_path, best_path)

    data_dir, meta = prepare_data(cfg, model_cfg.block_size, is_master, ddp)
    tokenizer = Tokenizer(meta)
    if ckpt is None:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=meta["vocab_size"])
    elif model_cfg.vocab_size != meta["vocab_size"]:
        raise ConfigError(f"the checkpoint's vocabulary has {model_cfg.vocab_size} tokens but {data_dir} has "
                          f"{meta['vocab_size']}: resume with the dataset it was trained on")
    elif vocabulary(ckpt["meta"]) != vocabulary(meta):  # the same size is not the same vocabulary
        trained_on = ckpt["train_config"].get("data_dir") or f"data/{ckpt['meta'].get('dataset')}"
        raise ConfigError(f"the checkpoint's vocabulary is not the one of {data_dir} (both have {meta['vocab_size']} "
                          f"tokens, but different ones): resume with the data it was trained on ({trained_on})")

    torch.manual_seed(cfg.seed + rank)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = MoDGPT(model_cfg).to(device)
    optimizer = configure_optimizer(model, cfg, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    iter_num, best_val_loss = 0, float("inf")
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt["scaler"] and scaler.is_enabled():  # the GradScaler's state; empty when trained in bf16/fp32
                scaler.load_state_dict(ckpt["scaler"])
            if world_size == 1:  # dropout (and the random control) continue exactly
                torch.set_rng_state(ckpt["rng_state"]["cpu"])
                if device_type == "cuda" and "cuda" in ckpt["rng_state"]:
                    torch.cuda.set_rng_state(ckpt["rng_state"]["cuda"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{ckpt_path} does not fit this model ({first_reason(e)}): "
                              f"train from scratch into another --out_dir") from None
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        if world_size > 1:  # only rank 0's state was saved: give each process a stream of its own
            torch.manual_seed(hash((cfg.seed, rank, iter_num)))
        if is_master:
            print(f"resuming from {ckpt_path} at iteration {iter_num}")
    ckpt = None  # free the memory

    autocast = (nullcontext() if dtype == "float32"
                else torch.autocast(device_type=device_type, dtype=getattr(torch, dtype)))
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[int(device.split(":")[1])]
                                                          if device_type == "cuda" else None)
    batches = Batches(data_dir, model_cfg.block_size, cfg.batch_size, device, cfg.seed, rank)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * model_cfg.block_size
    # forward + backward is about 3x the forward; per process, since each GPU is compared with its own peak
    flops_per_iter = (3 * raw_model.estimate_flops(model_cfg.block_size)["total"] * tokens_per_iter
                      / model_cfg.block_size / world_size)
    peak = peak_flops(cfg, device)
    if is_master and cfg.init_from == "scratch" and cfg.overwrite and not cfg.eval_only:
        for path in (ckpt_path, best_path):  # asked for: the earlier run's checkpoints go now, not half of them later
            if os.path.exists(path):
                os.remove(path)
                print(f"removed {path} of an earlier run (--overwrite=True)")
    if is_master:
        kind = (f"MoD, capacity {model_cfg.capacity}, routed blocks {model_cfg.routed_blocks()}, router "
                f"{model_cfg.router}/{model_cfg.router_weight}" if model_cfg.routed_blocks() else "dense baseline")
        print(f"{kind}: {raw_model.get_num_params() / 1e6:.2f}M parameters, {model_cfg.n_layer} layers, "
              f"device {device}, {dtype}, {tokens_per_iter:,} tokens per iteration")
    metrics = Metrics(os.path.join(out_dir, "metrics.jsonl"), iter_num if cfg.init_from == "resume" else None,
                      enabled=is_master, write=not cfg.eval_only)

    def random_state():
        state = dict(cpu=torch.get_rng_state())
        if device_type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def checkpoint(rng):  # rng: the random state at the top of iteration iter_num, where a resume starts
        return dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                    model_config=dataclasses.asdict(model_cfg), train_config=dataclasses.asdict(cfg), meta=meta,
                    iter_num=iter_num, best_val_loss=best_val_loss, rng_state=rng)

    def save(paths, rng):
        """Write the training state to each path, a save that a signal cannot cut short; never NaN/inf weights
        (returns False and writes nothing then)."""
        if not weights_are_finite(raw_model):
            return False
        state = checkpoint(rng)
        with (signals.save_in_progress() if signals else nullcontext()):
            for path in paths:
                save_checkpoint(path, state)
        return True

    last_eval, t_start, t_last = {}, time.time(), time.time()
    t_eval = 0.0  # seconds spent evaluating and saving: not training time
    t_warm = None  # (time, t_eval) once the first step is done: ms/iter leaves out that warm-up (and compilation)
    start_iter = iter_num
    with (StopSignals() if not ddp else nullcontext()) as signals, stop_on_bad_loss(ckpt_path):
        while True:
            rng = random_state()
            if signals and signals.received:  # between two iterations: the checkpoint holds whole iterations only
                print(f"\n{signals.received}: stopped at iteration {iter_num}")
                if iter_num > start_iter and save([ckpt_path], rng):
                    print(f"saved {ckpt_path}; continue with --init_from=resume --out_dir={out_dir}")
                elif iter_num > start_iter:
                    print(f"not saved: the weights are not finite (NaN or inf) at iteration {iter_num}; "
                          f"{ckpt_path} keeps the last good state (resume with a lower --learning_rate)")
                return dict(iter_num=iter_num, interrupted=True, signal=signals.received, ckpt_path=ckpt_path,
                            best_path=best_path, eval=last_eval, history=metrics.history)
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr

            if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters or cfg.eval_only:
                t0 = time.time()
                if is_master:
                    last_eval = evaluate(raw_model, batches, cfg, autocast)
                    print(format_eval(iter_num, last_eval))
                    if not all(math.isfinite(v) for v in last_eval.values()):
                        raise FloatingPointError(f"non-finite evaluation loss at iteration {iter_num}")
                    metrics.add("eval", iter_num, t0 - t_start - t_eval, t0 - t_start, lr=lr, **last_eval)
                    val = last_eval.get("val_predictor", last_eval["val_topk"])  # the loss that holds when sampling
                    if iter_num > start_iter:  # ckpt.pt at every evaluation; best.pt only when val improves
                        improved = val < best_val_loss
                        best_val_loss = min(best_val_loss, val)
                        # ckpt.pt first: if writing best.pt then fails, ckpt.pt's best_val_loss is too low rather
                        # than too high, so a later, worse model can never replace best.pt
                        if not save([ckpt_path, best_path] if improved else [ckpt_path], rng):
                            raise FloatingPointError(f"non-finite weights at iteration {iter_num}")
                        print(f"saved {ckpt_path}" + (f" and {best_path} (best val loss so far)" if improved else ""))
                spent = time.time() - t0
                t_eval += spent
                t_last += spent  # the next log line times training only
            if iter_num >= cfg.max_iters or cfg.eval_only:
                break

            # one optimisation step: accum_steps micro-batches, gradients averaged
            generator = batches.for_iteration(iter_num)
            for micro_step in range(accum_steps):
                x, y = batches.get("train", generator)
                if ddp:  # synchronise gradients only on the last micro-step
                    model.require_backward_grad_sync = micro_step == accum_steps - 1
                with autocast:  # check_input=False: Batches checked the token ids once, when it loaded the data
                    _, loss = model(x, y, check_input=False)
                    loss = loss / accum_steps
                scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            if t_warm is None:
                t_warm = (time.time(), t_eval)

            if iter_num % cfg.log_interval == 0 and is_master:
                total = loss.item() * accum_steps  # a CPU-GPU sync, so only every log_interval iterations
                if not math.isfinite(total):
                    raise FloatingPointError(f"the loss became {total} at iteration {iter_num}")
                stats = raw_model.last_stats
                lossf = stats["lm_loss"].item()  # the LM loss of the last micro-batch, comparable to eval losses
                now = time.time()
                dt = (now - t_last) / cfg.log_interval
                t_last = now
                line = f"iter {iter_num}: loss {lossf:.4f}, time {1000 * dt:.2f} ms, tok/s {tokens_per_iter / dt:,.0f}"
                if peak:
                    line += f", mfu {100 * flops_per_iter / dt / peak:.2f}%"
                if stats["routed_frac"].numel():
                    line += (f", routed {100 * stats['routed_frac'].mean().item():.1f}%, "
                             f"predictor {100 * stats['predictor_acc'].item():.1f}%")
                print(line)
                routing = (dict(routed_frac=stats["routed_frac"].mean().item(),
                                predictor_acc=stats["predictor_acc"].item()) if stats["routed_frac"].numel() else {})
                metrics.add("train", iter_num, now - t_start - t_eval, now - t_start, loss=lossf, lr=lr,
                            ms_per_iter=1000 * dt, **routing)

    wall = time.time() - t_start
    ms_per_iter = 0.0
    if t_warm is not None and iter_num - start_iter > 1:  # training time per step, after the first one
        ms_per_iter = 1000 * (time.time() - t_warm[0] - (t_eval - t_warm[1])) / (iter_num - start_iter - 1)
    result = dict(iter_num=iter_num, eval=last_eval, ckpt_path=ckpt_path, best_path=best_path, wall_s=wall,
                  ms_per_iter=ms_per_iter, interrupted=False, signal=None,
                  history=metrics.history)
    if is_master:
        print(f"done in {wall:.0f} s, {ms_per_iter:.1f} ms/iter")
    if is_master and cfg.sample_tokens > 0:
        raw_model.eval()
        start = torch.tensor([[tokenizer.newline_or_eot]], device=device)
        with autocast:
            out = raw_model.generate(start, cfg.sample_tokens, temperature=0.8, top_k=200)
        result["sample"] = tokenizer.decode(out[0].tolist())
        print("a sample" + (" (causal predictor routing):" if model_cfg.routed_blocks() else ":"))
        print(result["sample"])
    return result


def describe_os_error(e):
    """An OSError in a few words, with the path it is about: "out/ckpt.pt: No space left on device"."""
    return f"{e.filename}: {e.strerror}" if e.filename else str(e.strerror or e)


def cli(argv):
    """The command line: one line on stderr for anything wrong, and an exit status a shell can test."""
    try:
        result = main(**parse_args(argv))
    except (ConfigError, DataError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:  # anything not caught closer to its cause: still one line, naming the path
        raise SystemExit(f"error: {describe_os_error(e)}: check the path, its permissions and the "
                         f"free disk space") from None
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training began
        print("stopped at once: the checkpoints hold the last save that finished", file=sys.stderr)
        sys.exit(130)
    if result["interrupted"]:  # 128 + the signal's number, the shells' convention: 130 for SIGINT, 143 for SIGTERM
        sys.exit(128 + getattr(signal, result["signal"]))


if __name__ == "__main__":
    cli(sys.argv[1:])
