"""
Train a Mixture-of-Depths model (or the dense baseline) on Shakespeare, characters or GPT-2 BPE.

    python train.py                           # the whole job: prepare data, train, evaluate, save, print a sample
    python train.py --mod_every=0             # the dense baseline, same everything else
    python train.py --dataset=shakespeare --max_iters=500 --compile=True
    python train.py --init_from=resume        # continue out_dir/ckpt.pt exactly where it stopped
    torchrun --standalone --nproc_per_node=2 train.py --gradient_accumulation_steps=2   # DDP, 2 GPUs or processes

From Python (a notebook cell), the same training:

    import train
    result = train.main(dataset="shakespeare_char", max_iters=200)

Every field of TrainConfig and of mod.MoDConfig can be set as --key=value (or as a keyword of main()).
Defaults follow the device: nanoGPT's shakespeare_char setting on a GPU, its laptop setting on a CPU.
"""

import dataclasses
import difflib
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

from data.prepare import DataError, Tokenizer, load_meta, prepare
from mod import MoDConfig, MoDGPT

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class TrainConfig:
    # I/O
    dataset: str = "shakespeare_char"  # or "shakespeare" (GPT-2 BPE)
    data_dir: str = ""  # where train.bin/val.bin/meta.json live; "" means data/<dataset>
    out_dir: str = "out"
    init_from: str = "scratch"  # "scratch" or "resume" (from out_dir/ckpt.pt)
    always_save_checkpoint: bool = True  # False: save only when val loss improves
    eval_interval: int = 250
    eval_iters: int = 200
    log_interval: int = 10
    eval_only: bool = False
    sample_tokens: int = 300  # length of the sample printed at the end (0: none)
    # data and optimisation
    batch_size: int = 64
    gradient_accumulation_steps: int = 1  # in total, over all DDP processes
    max_iters: int = 5000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 5000  # cosine decay from learning_rate to min_lr over this many iterations
    decay_lr: bool = True
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    # system
    device: str = ""  # "" picks cuda, then mps, then cpu
    dtype: str = "auto"  # auto: bfloat16 on GPUs that have it, float16 + GradScaler on older GPUs, float32 on CPU
    compile: bool = False  # torch.compile the model (worth it on a GPU)
    peak_tflops: float = 0.0  # the device's peak, for MFU; 0 means look it up (known GPUs) or print no MFU
    seed: int = 1337


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
# configuration: defaults <- device preset <- checkpoint (resume) <- what the user asked for


def parse_args(argv):
    """['--key=value', ...] -> {key: value as a string}, checked against the known fields."""
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"cannot read argument {arg!r}: write settings as --key=value, e.g. --max_iters=200")
        key, value = arg[2:].split("=", 1)
        overrides[key] = value
    return overrides


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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)  # --dropout=0 is fine
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
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
    settings = dict(GPU_DEFAULTS if device_type == "cuda" else CPU_DEFAULTS)
    if checkpoint_config is not None:
        settings.update(checkpoint_config)
        model_fields = {f.name for f in fields(MoDConfig)} - {"dropout"}
        for k in sorted(model_fields & asked.keys()):
            if asked[k] != checkpoint_config[k]:
                raise ConfigError(f"the checkpoint was trained with {k}={checkpoint_config[k]!r}, not {asked[k]!r}: "
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
    need(cfg.grad_clip >= 0 and cfg.weight_decay >= 0, "--grad_clip and --weight_decay must be >= 0")


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
    older GPUs (Colab's T4) get float16 with a GradScaler; CPU and MPS train in float32."""
    if not device.startswith("cuda"):
        if requested in ("auto", "float32"):
            return "float32"
        raise ConfigError(f"--dtype={requested} is for CUDA GPUs; on {device} use --dtype=float32 (or auto)")
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
        for split in ("train", "val"):
            n = os.path.getsize(os.path.join(data_dir, f"{split}.bin")) // 2
            if n <= block_size:
                raise ConfigError(f"{split}.bin in {data_dir} holds {n} tokens, too few for block_size {block_size}: "
                                  f"use a smaller --block_size or more text")

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


def prepare_data(cfg, is_master, ddp):
    data_dir = cfg.data_dir or os.path.join(HERE, "data", cfg.dataset)
    needed = [os.path.join(data_dir, f) for f in ("train.bin", "val.bin", "meta.json")]
    if is_master and not all(os.path.exists(p) for p in needed):
        if cfg.data_dir:
            raise ConfigError(f"--data_dir={cfg.data_dir} lacks train.bin/val.bin/meta.json: "
                              f"run python data/{cfg.dataset}/prepare.py --out_dir={cfg.data_dir}")
        print(f"preparing {cfg.dataset} in {data_dir} ...")
        prepare(cfg.dataset, out_dir=data_dir)
    if ddp:
        torch.distributed.barrier()
    return data_dir, load_meta(data_dir)


# -----------------------------------------------------------------------------
# optimiser, schedule, checkpoints


def configure_optimizer(model, cfg, device_type):
    """AdamW with weight decay on matrices (Linear and embedding weights) only, not on biases and LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device_type == "cuda")


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
    """Write to a temporary file, then rename: a crash or Ctrl-C mid-write never destroys the last good checkpoint."""
    tmp = path + ".tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write failed: leave no half-written file behind
            os.remove(tmp)


def load_checkpoint(path):
    if not os.path.exists(path):
        raise ConfigError(f"--init_from=resume but there is no checkpoint at {path}: "
                          f"train one first (python train.py --out_dir={os.path.dirname(path)})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only: no pickle code
        missing = {"model", "optimizer", "model_config", "train_config", "iter_num"} - set(ckpt)
    except Exception as e:
        raise ConfigError(f"{path} is not a readable checkpoint ({type(e).__name__}): it may be corrupt or from "
                          f"another program; delete it or train into another --out_dir") from None
    if missing:
        raise ConfigError(f"{path} is not a checkpoint of this train.py (missing {sorted(missing)}): "
                          f"train into another --out_dir")
    return ckpt


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


class CtrlC:
    """While training, the first Ctrl-C only raises a flag: the loop saves a checkpoint and stops between two
    iterations, so the checkpoint never holds half an iteration and a resume continues exactly. A second Ctrl-C
    stops at once, without saving. (Single process only: under DDP every process gets the signal at its own time.)"""

    def __init__(self):
        self.pressed = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = signal.signal(signal.SIGINT, self.handler)
        return self

    def handler(self, signum, frame):  # only sets the flag: printing here could collide with the loop's printing
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class Metrics:
    """The run's history for plotting: every log line and every evaluation as one dict (main() returns the list),
    also written as a line of JSON to out_dir/metrics.jsonl. time_s is training time, evaluations and saving
    excluded (the fair clock for comparing models); wall_s is all of it.

    A run from scratch starts a fresh file. A resumed run keeps the lines up to its checkpoint's iteration (later
    ones came from iterations it does again), continues both clocks from the last line it kept, and appends. An
    evaluation of an iteration already recorded (a resume evaluates its first iteration again) replaces the old one.
    Only the master process writes; the others keep an empty history."""

    def __init__(self, path, resume_iter=None, enabled=True):
        self.path, self.enabled, self.history = path, enabled, []
        if not enabled:
            return
        if resume_iter is not None and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:  # a line cut short by a crash
                        continue
                    if isinstance(record, dict) and record.get("iter", math.inf) <= resume_iter:
                        self.history.append(record)
        last = self.history[-1] if self.history else {}
        self.time_offset, self.wall_offset = last.get("time_s", 0.0), last.get("wall_s", 0.0)
        self.rewrite()

    def rewrite(self):
        tmp = self.path + ".tmp"  # write and rename, as the checkpoint: a crash leaves the old file whole
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
                model(x, y, routing=routing)
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
    whose every field counts (the dataclasses' defaults are nanoGPT's GPU setting); keywords win over both.
    Returns a dict with the last evaluation, the iteration reached, the checkpoint path, timings and the history
    (every log line and evaluation as a dict, as written to out_dir/metrics.jsonl: see Metrics)."""
    settings = {}
    for config in configs:
        settings.update(config if isinstance(config, dict) else dataclasses.asdict(config))
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


def _train(settings, device, device_type, ddp, rank, world_size, is_master):
    out_dir = str(settings.get("out_dir", TrainConfig.out_dir))
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    ckpt = None
    if str(settings.get("init_from", "scratch")) == "resume":
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

    data_dir, meta = prepare_data(cfg, is_master, ddp)
    tokenizer = Tokenizer(meta)
    if ckpt is None:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=meta["vocab_size"])
    elif model_cfg.vocab_size != meta["vocab_size"]:
        raise ConfigError(f"the checkpoint's vocabulary has {model_cfg.vocab_size} tokens but {data_dir} has "
                          f"{meta['vocab_size']}: resume with the dataset it was trained on")

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
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError(f"{ckpt_path} does not fit this model ({str(e).splitlines()[0]}): "
                              f"train from scratch into another --out_dir") from None
        if ckpt.get("scaler") and scaler.is_enabled():  # empty when it was trained in bf16 or fp32
            scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        if world_size == 1:  # dropout (and the random control) continue exactly
            torch.set_rng_state(ckpt["rng_state"]["cpu"])
            if device_type == "cuda" and "cuda" in ckpt["rng_state"]:
                torch.cuda.set_rng_state(ckpt["rng_state"]["cuda"])
        else:  # only rank 0's state was saved: give each process a stream of its own
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
    if is_master:
        os.makedirs(out_dir, exist_ok=True)
        kind = (f"MoD, capacity {model_cfg.capacity}, routed blocks {model_cfg.routed_blocks()}, router "
                f"{model_cfg.router}/{model_cfg.router_weight}" if model_cfg.routed_blocks() else "dense baseline")
        print(f"{kind}: {raw_model.get_num_params() / 1e6:.2f}M parameters, {model_cfg.n_layer} layers, "
              f"device {device}, {dtype}, {tokens_per_iter:,} tokens per iteration")
    metrics = Metrics(os.path.join(out_dir, "metrics.jsonl"), iter_num if cfg.init_from == "resume" else None,
                      enabled=is_master)

    def random_state():
        state = dict(cpu=torch.get_rng_state())
        if device_type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def checkpoint(rng):  # rng: the random state at the top of iteration iter_num, where a resume starts
        return dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                    model_config=dataclasses.asdict(model_cfg), train_config=dataclasses.asdict(cfg), meta=meta,
                    iter_num=iter_num, best_val_loss=best_val_loss, rng_state=rng)

    last_eval, t_start, t_last = {}, time.time(), time.time()
    t_eval = 0.0  # seconds spent evaluating and saving: not training time
    t_warm = None  # (time, t_eval) once the first step is done: ms/iter leaves out that warm-up (and compilation)
    start_iter = iter_num
    with (CtrlC() if not ddp else nullcontext()) as ctrl_c, stop_on_bad_loss(ckpt_path):
        while True:
            rng = random_state()
            if ctrl_c and ctrl_c.pressed:  # between two iterations: the checkpoint holds whole iterations only
                print(f"\nCtrl-C: stopped at iteration {iter_num}")
                if iter_num > start_iter:
                    save_checkpoint(ckpt_path, checkpoint(rng))
                    print(f"saved {ckpt_path}; continue with --init_from=resume --out_dir={out_dir}")
                return dict(iter_num=iter_num, interrupted=True, ckpt_path=ckpt_path, eval=last_eval,
                            history=metrics.history)
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
                    val = last_eval.get("val_predictor", last_eval["val_topk"])
                    if iter_num > start_iter and (val < best_val_loss or cfg.always_save_checkpoint):
                        best_val_loss = min(best_val_loss, val)
                        save_checkpoint(ckpt_path, checkpoint(rng))
                        print(f"saved checkpoint to {ckpt_path}")
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
                with autocast:
                    _, loss = model(x, y)
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
    result = dict(iter_num=iter_num, eval=last_eval, ckpt_path=ckpt_path, wall_s=wall, ms_per_iter=ms_per_iter,
                  interrupted=False, history=metrics.history)
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


def cli(argv):
    try:
        overrides = parse_args(argv)
        main(**overrides)
    except (ConfigError, DataError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    cli(sys.argv[1:])
