"""
Train a Mixture-of-Depths model (or the dense baseline) on Shakespeare, characters or GPT-2 BPE, as nanoGPT does.

    python train.py                                     # prepare the data, train, evaluate, save, print a sample
    python train.py --help                              # every setting, with its type, default and meaning
    python train.py --mod_every=0 --out_dir=out-dense   # the dense baseline, same everything else
    python train.py --init_from=resume                  # continue out/ckpt.pt exactly where it stopped
    torchrun --standalone --nproc_per_node=2 train.py --gradient_accumulation_steps=2   # DDP, 2 GPUs or processes
    import train; result = train.main(max_iters=200)    # the same from Python (a notebook cell)

Read top to bottom: settings, device, data, model and optimizer, learning rate, evaluation, the training loop, and
main() last. What keeps a run safe (checkpoints, Ctrl-C, the command line, metrics.jsonl) lives in plumbing.py.
"""

import dataclasses
import math
import os
import signal
import sys
from contextlib import closing
from dataclasses import dataclass

import numpy as np
import torch

from data.prepare import Tokenizer, check_same_vocabulary, dataset_dir, load_dataset, prepare_if_missing
from mod import MoDConfig, MoDGPT, predictor_scores
from plumbing import (CheckpointError, Checkpoints, Clock, Metrics, StopSignals, allow_tf32, autocast_for,
                      check_train_config, config_parser, format_eval, merge_settings, on_first_process,
                      parameters_without_gradient, peak_flops, pick_device, pick_dtype, predictor_text, random_state,
                      require, resolve_config, run_cli, stop_on_bad_loss)

# -----------------------------------------------------------------------------
# settings: every field of TrainConfig and of mod.MoDConfig is a flag, --key=value (python train.py --help)


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
    compile: bool = False  # torch.compile the model: one graph per step, so Python no longer holds a GPU back
    peak_tflops: float = 0.0  # the device's peak, for MFU; 0 means look it up (known GPUs) or print no MFU
    seed: int = 1337  # random seed of the initialisation, the batches and dropout


# nanoGPT's settings for shakespeare_char: config/train_shakespeare_char.py on a GPU, its README's laptop line on a CPU
# (which logs every iteration; every 50th keeps a CPU run's log readable). Compiling is the default on a GPU only.
GPU_DEFAULTS = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64,
                    max_iters=5000, lr_decay_iters=5000, eval_interval=250, eval_iters=200, log_interval=10,
                    compile=True)
CPU_DEFAULTS = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, batch_size=12,
                    max_iters=2000, lr_decay_iters=2000, eval_interval=250, eval_iters=20, log_interval=50)


# -----------------------------------------------------------------------------
# device and dtype (plumbing.pick_dtype: bf16, or fp16 with a GradScaler, where a GPU gains from it)


def setup_device(requested):
    """The device to train on, and whether this is one of several DDP processes started by torchrun, with its rank
    and the number of processes."""
    device = pick_device(requested)
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world_size = 0, 1
    if ddp and device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per process
    if ":" in device:  # "cuda:1": make it the current GPU, so capability, name and autocast refer to it
        torch.cuda.set_device(device)
    if ddp:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        cuda = device.startswith("cuda")  # NCCL bound to this process's GPU from the start
        torch.distributed.init_process_group("nccl" if cuda else "gloo", device_id=torch.device(device) if cuda
                                             else None)
    return device, ddp, rank, world_size


# -----------------------------------------------------------------------------
# data: random windows of the token stream, as nanoGPT


class Batches:
    """Random (x, y) windows from train.bin / val.bin. The windows of iteration `it` come from a generator seeded
    by (seed, rank, it), so a resumed run sees exactly the batches an uninterrupted run would have seen. The files
    checked when the data was loaded stay open: a dataset prepared again meanwhile (new files renamed into place) is
    never seen, so a run trains on, and saves the vocabulary of, what was checked."""

    def __init__(self, data_dir, block_size, batch_size, device, seed, rank):
        self.block_size, self.batch_size, self.device, self.seed, self.rank = block_size, batch_size, device, seed, rank
        self.files = {split: open(os.path.join(data_dir, f"{split}.bin"), "rb") for split in ("train", "val")}

    def close(self):
        for f in self.files.values():
            f.close()

    def get(self, split, generator):
        # map the file again every batch to avoid a memory leak (see nanoGPT's train.py)
        data = np.memmap(self.files[split], dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - self.block_size, (self.batch_size,), generator=generator)
        x = torch.stack([torch.from_numpy(data[i:i + self.block_size].astype(np.int64)) for i in ix])  # (B, T)
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + self.block_size].astype(np.int64)) for i in ix])
        if self.device.startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def for_iteration(self, it):
        return torch.Generator().manual_seed(hash((self.seed, self.rank, it)))

    def for_eval(self):
        return torch.Generator().manual_seed(self.seed)  # the same eval batches every time: comparable curves


def load_data(cfg, block_size, rank, world_size):
    """The data folder and its meta. data/<dataset> is prepared on first use of a new run (never over a partial
    dataset; a resume trains on what exists). The token files are checked here, once, so that the training step
    need not check its batches."""
    data_dir, may_prepare = cfg.data_dir or dataset_dir(cfg.dataset), not cfg.data_dir and cfg.init_from == "scratch"
    on_first_process(lambda: prepare_if_missing(cfg.dataset, data_dir, block_size, may_prepare), rank, world_size)
    return data_dir, load_dataset(data_dir, cfg.dataset, block_size)


# -----------------------------------------------------------------------------
# model and optimizer


def configure_optimizer(model, cfg, device_type):
    """AdamW with weight decay on matrices (Linear and embedding weights) only, not on biases and LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    # fused: one kernel updates every parameter, instead of about ten small operations per parameter tensor; on a
    # CPU (torch >= 2.4) that is ~10% of a training step at the laptop shape
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device_type in ("cuda", "cpu"))


def clip_groups(model):
    """The trunk's parameters and the predictors', whose gradient norms are clipped apart: under one norm, large
    predictor gradients would shrink the trunk's step, despite the stop-gradient (section 3.5). Apart, the predictors
    cannot change what the language model learns (test_scripts.py checks it)."""
    named = list(model.named_parameters())
    predictors = [p for name, p in named if ".predictor" in name]  # MoDBlock.predictor, mode.py's .predictors
    return [group for group in ([p for name, p in named if ".predictor" not in name], predictors) if group]


# -----------------------------------------------------------------------------
# learning rate


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


# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(model, batches, cfg, autocast):
    """LM loss on train and val under top-k routing, val loss under causal predictor routing (the number that holds
    when sampling), and how well the predictor matches top-k (mod.predictor_scores). The same batches every time."""
    model.eval()
    routed = bool(model.config.routed_blocks())
    out = {}
    for split, routing in [("train", "topk"), ("val", "topk")] + ([("val", "predictor")] if routed else []):
        generator = batches.for_eval()
        losses, counts = [], 0
        for _ in range(cfg.eval_iters):
            x, y = batches.get(split, generator)
            with autocast:
                model(x, y, routing=routing, check_input=False)
            losses.append(model.last_stats["lm_loss"].item())
            counts = counts + model.last_stats["predictor_counts"]
        out[f"{split}_{routing}"] = sum(losses) / len(losses)
        if split == "val" and routing == "topk" and routed:
            out.update({f"predictor_{k}": v for k, v in predictor_scores(counts).items()})
    model.train()
    return out


def log_values(model, cfg, it, loss, dt, world_size):
    """The log line's numbers at iteration it, dt being the seconds per iteration. Reading the loss is a host-device
    sync, so it happens every log_interval iterations only."""
    stats, T = model.last_stats, model.config.block_size
    total = loss.item()
    if not math.isfinite(total):
        raise FloatingPointError(f"the loss became {total} at iteration {it}")
    values = dict(loss=stats["lm_loss"].item(), ms_per_iter=1000 * dt)  # the LM loss, comparable to eval losses
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * T
    text = f"loss {values['loss']:.4f}, time {1000 * dt:.2f} ms, tok/s {tokens_per_iter / dt:,.0f}"
    peak = peak_flops(cfg.peak_tflops, cfg.device)
    if peak:  # forward + backward is ~3x the forward; per process, as each GPU is compared with its own peak
        flops_per_iter = 3 * model.estimate_flops(T)["total"] * tokens_per_iter / T / world_size
        text += f", mfu {100 * flops_per_iter / dt / peak:.2f}%"
    if stats["routed_frac"].numel():  # a MoD model: the share routed into its routed blocks, the predictor's scores
        values["routed_frac"] = stats["routed_frac"].mean().item()
        values.update({f"predictor_{k}": v for k, v in predictor_scores(stats["predictor_counts"]).items()})
        text += f", routed {100 * values['routed_frac']:.1f}%, predictor " + predictor_text(values)
    return text, values


# -----------------------------------------------------------------------------
# the training loop


def train(cfg, model, optimizer, scaler, autocast, batches, checkpoints, tokenizer, iter_num, rank, world_size):
    """Train model (a MoDGPT) from iteration iter_num to cfg.max_iters: every eval_interval iterations evaluate and
    save (ckpt.pt; best.pt when val improves), every iteration one optimisation step, every log_interval a log line.
    A signal, a closed stdout or an error stops it with ckpt.pt saved. Returns what main() returns."""
    device_type = "cuda" if cfg.device.startswith("cuda") else cfg.device
    is_master, accum_steps = rank == 0, cfg.gradient_accumulation_steps // world_size
    raw_model = ddp = model  # raw_model is evaluated, saved and sampled; `model` is what the step calls
    if world_size > 1:  # DDP must know of parameters that get no gradient (the random control's router)
        unused = parameters_without_gradient(raw_model, *batches.get("train", batches.for_eval()))
        device_ids = [torch.cuda.current_device()] if device_type == "cuda" else None
        model = ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids, find_unused_parameters=bool(unused))
    if cfg.compile:  # after DDP, so that its all-reduce of each bucket overlaps the rest of the compiled backward
        model = torch.compile(model)

    def state(it, rng):  # what ckpt.pt holds: everything a resume needs, at the top of iteration it
        return checkpoints.state(raw_model, optimizer, scaler, raw_model.config, cfg, tokenizer.meta, it, rng)

    start_iter, last_eval, clock, rng = iter_num, {}, Clock(), random_state(device_type)
    groups = clip_groups(raw_model)
    if is_master and iter_num >= cfg.max_iters and not cfg.eval_only:
        print(f"note: nothing to train: the run is at iteration {iter_num} and --max_iters={cfg.max_iters}")
    with checkpoints.run(cfg.init_from == "scratch" and cfg.overwrite, enabled=is_master and not cfg.eval_only), \
            closing(batches), StopSignals(enabled=world_size == 1) as signals, stop_on_bad_loss(checkpoints.latest):
        metrics = Metrics(os.path.join(checkpoints.out_dir, "metrics.jsonl"), iter_num if cfg.init_from == "resume"
                          else None, enabled=is_master, write=not cfg.eval_only)
        try:
            while not signals.received:  # checked between iterations: a checkpoint holds whole iterations only
                lr = get_lr(iter_num, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                # evaluate, and save ckpt.pt (and best.pt when the loss that holds when sampling improves)
                if is_master and (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters or cfg.eval_only):
                    with clock.paused():  # evaluating and saving is not training time
                        times = clock.times()
                        last_eval = evaluate(raw_model, batches, cfg, autocast)
                        print(format_eval(iter_num, last_eval))
                        if not all(math.isfinite(v) for v in last_eval.values()):
                            raise FloatingPointError(f"non-finite evaluation loss at iteration {iter_num}")
                        metrics.add("eval", iter_num, *times, lr=lr, **last_eval)
                        if iter_num > start_iter:  # the loss that holds when sampling decides what is best
                            saved = checkpoints.save(state(iter_num, rng), last_eval.get("val_predictor",
                                                                                       last_eval["val_topk"]), signals)
                            if not saved:
                                raise FloatingPointError(f"non-finite weights at iteration {iter_num}")
                            best = " (best val loss so far)" if len(saved) > 1 else ""
                            print("saved " + " and ".join(saved) + best)
                if iter_num >= cfg.max_iters or cfg.eval_only:
                    break

                # one optimisation step: accum_steps micro-batches, gradients averaged
                generator = batches.for_iteration(iter_num)
                for micro_step in range(accum_steps):
                    x, y = batches.get("train", generator)  # (B, T) token ids and their next tokens
                    if world_size > 1:  # synchronise gradients only on the last micro-step
                        ddp.require_backward_grad_sync = micro_step == accum_steps - 1
                    with autocast:  # check_input=False: the token ids were checked once, when the data was loaded
                        _, loss = model(x, y, check_input=False)
                        loss = loss / accum_steps
                    scaler.scale(loss).backward()
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    for group in groups:  # the trunk and the predictors apart: see clip_groups
                        torch.nn.utils.clip_grad_norm_(group, cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                iter_num, rng = iter_num + 1, random_state(device_type)  # where a resume of this state starts
                clock.step_done()

                if iter_num % cfg.log_interval == 0 and is_master:
                    text, values = log_values(raw_model, cfg, iter_num, loss * accum_steps,
                                              clock.lap(cfg.log_interval), world_size)
                    print(f"iter {iter_num}: {text}")
                    metrics.add("train", iter_num, *clock.times(), lr=lr, **values)
        except Exception as e:  # an error (not a NaN, not a failed save): keep what was trained, as a signal does
            if is_master and iter_num > start_iter and not isinstance(e, (FloatingPointError, CheckpointError)):
                checkpoints.save_and_stop(state(iter_num, rng), signals, f"an error stopped iteration {iter_num}: ")
            raise
        if signals.received and is_master:
            print(f"\n{signals.received}: stopped at iteration {iter_num}")
            if iter_num > start_iter:
                checkpoints.save_and_stop(state(iter_num, rng), signals)

    result = dict(iter_num=iter_num, eval=last_eval, ckpt_path=checkpoints.latest, best_path=checkpoints.best,
                  wall_s=clock.times()[1], ms_per_iter=clock.ms_per_iter(iter_num - start_iter),
                  interrupted=signals.received is not None, signal=signals.received, history=metrics.history)
    if is_master and not signals.received:
        print(f"done in {result['wall_s']:.0f} s, {result['ms_per_iter']:.1f} ms/iter")
        if cfg.sample_tokens > 0:
            result["sample"] = sample_text(raw_model, tokenizer, cfg.sample_tokens, autocast)
    return result


def sample_text(model, tokenizer, tokens, autocast):
    """A sample of the trained model, routed causally by its predictors (sample.py shows more)."""
    model.eval()
    start = torch.tensor([[tokenizer.newline_or_eot]], device=model.lm_head.weight.device)
    with autocast:
        text = tokenizer.decode(model.generate(start, tokens, temperature=0.8, top_k=200)[0].tolist())
    print(f"a sample{' (causal predictor routing)' if model.config.routed_blocks() else ''}:\n{text}")
    return text


# -----------------------------------------------------------------------------
# main: settings, data, model, optimizer (resumed from ckpt.pt if asked), then the loop; the command line


def main(*configs, **overrides):
    """Train. Settings are keywords, main(max_iters=200, mod_every=0), on top of the device's preset; or whole
    TrainConfig / MoDConfig objects or dicts, every field counting but vocab_size (the data's); keywords win.
    Errors (plumbing: ConfigError, DataError, CheckpointError; SystemExit for a NaN loss) say what to do. Returns
    the last evaluation, the iteration reached, checkpoint paths, timings and the history (metrics.jsonl's records);
    stopped by Ctrl-C, SIGTERM or a closed stdout it returns too, interrupted=True, signal "SIGINT", "SIGTERM" or
    "SIGPIPE"."""
    settings = merge_settings(configs, overrides, TrainConfig, MoDConfig)
    device, ddp, rank, world_size = setup_device(str(settings.get("device", "")))
    try:
        result = setup_and_train(settings, device, rank, world_size)
    except BaseException:
        if ddp:
            torch.distributed.destroy_process_group()
        raise
    if ddp:  # wait for every process (rank 0 evaluates and saves last) before tearing the group down
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


def setup_and_train(settings, device, rank, world_size):
    """The settings (the device's preset <- a resumed checkpoint's <- what was asked), every check before any work,
    the data, the model and the optimizer; then train()."""
    device_type = "cuda" if device.startswith("cuda") else device
    checkpoints = Checkpoints(str(settings.get("out_dir", TrainConfig.out_dir)))
    ckpt = checkpoints.load_latest(TrainConfig, MoDConfig) if settings.get("init_from") == "resume" else None
    saved = None if ckpt is None else checkpoints.saved_settings(ckpt)
    preset = GPU_DEFAULTS if device_type == "cuda" else CPU_DEFAULTS
    cfg, model_fields = resolve_config(settings, preset, TrainConfig, MoDConfig, saved)
    cfg.device = device
    check_train_config(cfg)
    require(cfg.gradient_accumulation_steps % world_size == 0,
            f"--gradient_accumulation_steps={cfg.gradient_accumulation_steps} is the total over all processes and "
            f"must be a multiple of their number ({world_size}): e.g. --gradient_accumulation_steps={world_size}")
    dtype = pick_dtype(cfg.dtype, device)  # bf16/fp16 autocast where it helps (checked now, before any work)
    model_cfg = MoDConfig(**model_fields)  # checks the model settings (ValueError with the fix) before any work
    on_first_process(lambda: checkpoints.check(cfg.init_from, cfg.overwrite, cfg.eval_only), rank, world_size)
    data_dir, meta = load_data(cfg, model_cfg.block_size, rank, world_size)
    tokenizer = Tokenizer(meta)  # now, not after training: GPT-2's BPE needs tiktoken's files
    if ckpt is None:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=meta["vocab_size"])
    else:
        check_same_vocabulary(model_cfg.vocab_size, ckpt["meta"], meta, data_dir,
                              trained_on=ckpt["train_config"].get("data_dir") or f"data/{ckpt['meta'].get('dataset')}")

    torch.manual_seed(cfg.seed + rank)
    if device_type == "cuda":
        allow_tf32()
    model = MoDGPT(model_cfg).to(device)
    optimizer = configure_optimizer(model, cfg, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))  # fp16 needs its loss scaled
    iter_num = 0
    if ckpt is not None:
        iter_num = checkpoints.restore(ckpt, model, optimizer, scaler, random_state=world_size == 1)
        if world_size > 1:  # only rank 0's state was saved: give each process a stream of its own
            torch.manual_seed(hash((cfg.seed, rank, iter_num)))
        if rank == 0:
            print(f"resuming from {checkpoints.latest} at iteration {iter_num}")
    del ckpt  # free the memory
    if rank == 0:
        kind = (f"MoD, capacity {model_cfg.capacity}, routed blocks {model_cfg.routed_blocks()}, router "
                f"{model_cfg.router}/{model_cfg.router_weight}" if model_cfg.routed_blocks() else "dense baseline")
        if model_cfg.n_experts:  # mode.py: experts in the routed blocks
            kind = (f"{dict(staged='staged MoDE', integrated='integrated MoDE').get(model_cfg.mode, 'MoE')}, "
                    f"{model_cfg.n_experts} experts at capacity {model_cfg.expert_capacity} in blocks "
                    f"{model_cfg.routed_blocks()}" + (f", MoD capacity {model_cfg.capacity}"
                                                      if model_cfg.mode == "staged" else ""))
        print(f"{kind}: {model.get_num_params() / 1e6:.2f}M parameters, {model_cfg.n_layer} layers, device "
              f"{device}, {dtype}, {cfg.gradient_accumulation_steps * cfg.batch_size * model_cfg.block_size:,} "
              f"tokens per iteration")
    autocast = autocast_for(dtype, device_type)
    batches = Batches(data_dir, model_cfg.block_size, cfg.batch_size, device, cfg.seed, rank)
    return train(cfg, model, optimizer, scaler, autocast, batches, checkpoints, tokenizer, iter_num, rank, world_size)


def parse_args(argv):
    """['--key=value', ...] or ['--key', 'value', ...] -> {key: value as a string}, checked against the fields."""
    parser = config_parser(
        "train.py", configs=[(TrainConfig, "TrainConfig"), (MoDConfig, "MoDConfig in mod.py")],
        presets={"on a GPU": GPU_DEFAULTS, "on a CPU": CPU_DEFAULTS},
        notes={"vocab_size": ("comes from the data's meta.json: not set by hand", "from the data")},
        description="Train a Mixture-of-Depths model (or the dense baseline) on Shakespeare. Every setting is "
                    "--key=value (or --key value; a bool alone, --compile, means True) and a keyword of train.main(). "
                    "Defaults follow the device: nanoGPT's shakespeare_char setting on a GPU, its laptop one on a CPU.",
        epilog="Checkpoints: out_dir/ckpt.pt is the latest state (--init_from=resume continues it), out_dir/best.pt "
               "the lowest validation loss (sample.py loads it). Ctrl-C or SIGTERM: finish the iteration, save "
               "ckpt.pt, stop. Exit status: 0 done, 1 error, 130 Ctrl-C, 143 SIGTERM, 141 a closed stdout.")
    return vars(parser.parse_args(argv))


def cli(argv):
    """The command line: one line on stderr for anything wrong, and an exit status a shell can test."""
    result = run_cli(lambda: main(**parse_args(argv)),
                     on_interrupt="stopped at once: the checkpoints hold the last save that finished")
    if result["interrupted"]:  # 128 + the signal's number, the shells' convention: 130 for SIGINT, 143 for SIGTERM
        sys.exit(128 + getattr(signal, result["signal"]))


if __name__ == "__main__":
    cli(sys.argv[1:])
