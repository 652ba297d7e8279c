"""
The plumbing of the scripts: what train.py, sample.py, bench.py and data/prepare.py need to be safe and pleasant to
run, none of which is about Mixture-of-Depths (that is mod.py, with train.py and sample.py). Read in this order:

  errors            ConfigError, DataError, CheckpointError: messages that say what is wrong and what to do
  settings          ArgumentParser, config_parser (--help from the fields' comments), resolve_config,
                    check_train_config
  devices           pick_device, on_first_process and parameters_without_gradient (DDP), pick_dtype, autocast_for,
                    allow_tf32
  command lines     run_cli: one line for any error (the unexpected too), exit statuses, SIGTERM, closed pipes
  files             write_atomically, check_writable
  checkpoints       Checkpoints: ckpt.pt and best.pt, the whole checkpoint policy in one place, and the out_dir lock
  signals           StopSignals: Ctrl-C, SIGTERM and a closed stdout finish the iteration and save
  metrics           Clock, Metrics (metrics.jsonl), read_metrics, peak_flops, format_eval, predictor_text

torch is imported only inside the functions that need it, so that preparing data never imports it.
"""

import argparse
import contextlib
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
from contextlib import contextmanager
from dataclasses import fields

# -----------------------------------------------------------------------------
# errors: each message says what is wrong and what to do; a command line prints it as one line


class UserError(Exception):
    """Something the user can fix; the message says how."""


class ConfigError(UserError, ValueError):
    """A bad setting (a flag, a keyword of main(), a value in a checkpoint's config)."""


class DataError(UserError):
    """Missing or bad data: the text, train.bin/val.bin or meta.json."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read, is damaged, does not fit the model, or cannot be written."""


def is_int(value):
    """An int that is not a bool (True is an int to Python, never to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def require(ok, message, error=ConfigError):
    if not ok:
        raise error(message)


def first_reason(error):
    """The line of an exception's message that says what went wrong (load_state_dict's first line only says that
    something did)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]


# -----------------------------------------------------------------------------
# settings: the flags, --help, and the layers of defaults, checkpoint and user


class ArgumentParser(argparse.ArgumentParser):
    """argparse for every command line of the project, with four changes: a bad flag is one line (a ConfigError,
    which run_cli prints as "error: ...") instead of the usage and exit status 2; a flag given twice is refused
    instead of the last one silently winning; a flag is never abbreviated (--max_iter is not taken for --max_iters);
    and an unknown one gets a "did you mean". `listing` ends the unknown-flag message: where the flags are listed."""

    def __init__(self, listing="", **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)
        self.listing = listing or f"python {self.prog} --help lists them"

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        names = [arg.split("=", 1)[0] for arg in args if arg.startswith("--")]
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(f"{name} is given {names.count(name)} times: give it once")
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown and not unknown[0].startswith("--"):
            raise ConfigError(f"cannot read argument {unknown[0]!r}: write settings as --key=value; {self.listing}")
        if unknown:
            key = unknown[0][2:].split("=", 1)[0]
            known = [option[2:] for action in self._actions for option in action.option_strings]
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise ConfigError(f"unknown setting --{key}{hint}; {self.listing}")
        return namespace

    def error(self, message):  # argparse calls this for a bad value or a missing one
        raise ConfigError(f"{message} (python {self.prog} --help lists the settings)")


def setting_groups(config_class):
    """[(title, [(field, meaning), ...]), ...] from a dataclass's source: the comment beside a field is its meaning,
    written once, and a comment on a line of its own ("# I/O") starts a group. tokenize finds the comments, so
    spacing and a '#' inside a string do not matter."""
    import inspect
    import io
    import tokenize
    source = inspect.getsource(config_class)
    lines = source.splitlines()
    names = {f.name for f in fields(config_class)}
    groups = [("", [])]
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        code = lines[token.start[0] - 1][:token.start[1]]
        text = token.string.lstrip("#").strip(" -")
        field = re.match(r"\s*(\w+)\s*:", code)
        if not code.strip():
            groups.append((text, []))
        elif field and field.group(1) in names:
            groups[-1][1].append((field.group(1), text))
    return [(title, entries) for title, entries in groups if entries]


def defined_in(config_class):
    """ "TrainConfig in train.py": a class and the file that defines it."""
    import inspect
    return f"{config_class.__name__} in {os.path.basename(inspect.getsourcefile(config_class))}"


def default_text(name, default, presets):
    """A setting's default as --help shows it: "64 on a GPU, 12 on a CPU" where the presets differ."""
    shown = {label: '""' if value == "" else str(value)
             for label, value in ((label, preset.get(name, default)) for label, preset in presets.items())}
    if len(set(shown.values())) == 1:
        return next(iter(shown.values()))
    return ", ".join(f"{value} {label}" for label, value in shown.items())


def config_parser(prog, description, epilog, configs, presets, notes):
    """A parser with a flag per field of each dataclass in configs [(class, where it lives), ...], grouped and
    explained as in their source (setting_groups). presets {"on a GPU": {field: default}, ...} are shown as the
    defaults where they differ from the dataclass's; notes {field: (meaning, default)} replace what the source says."""
    listing = " and ".join(defined_in(config) for config, _ in configs)
    parser = ArgumentParser(prog=prog, usage=f"python {prog} [--key=value ...]", description=description,
                            epilog=epilog, listing=f"the settings are the fields of {listing}")
    for config, where in configs:
        field_of = {f.name: f for f in fields(config)}
        for title, entries in setting_groups(config):
            group = parser.add_argument_group(f"{title or 'model'} ({where})")
            for name, meaning in entries:
                kind = field_of[name].type
                meaning, default = notes.get(name, (meaning, default_text(name, field_of[name].default, presets)))
                bool_alone = dict(nargs="?", const="True") if kind is bool else {}  # --compile is --compile=True
                group.add_argument(f"--{name}", metavar=kind.__name__, default=argparse.SUPPRESS, **bool_alone,
                                   help=f"{meaning} (default: {default})".replace("%", "%%"))
    return parser


def convert(key, value, kind):
    """One setting converted to its field's type: strings (from a command line) are parsed, other values checked."""
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif kind is int:
        if is_int(value):
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


def resolve_config(asked, preset, train_class, model_class, saved=None):
    """(train_class object, dict of model_class fields) from the layers of settings: the dataclasses' defaults <-
    preset (the device's) <- saved (a checkpoint's, when resuming) <- asked (the user's). Every value is converted
    to its field's type, with one clear error for anything wrong. A resumed model keeps the shape it was trained
    with: asking for another is an error, except dropout. vocab_size comes from the data, never from the user."""
    types = {f.name: f.type for config in (model_class, train_class) for f in fields(config)}
    for key in asked:
        if key not in types:
            close = difflib.get_close_matches(key, types, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise ConfigError(f"unknown setting --{key}{hint}; the settings are the fields of "
                              f"{defined_in(train_class)} and {defined_in(model_class)}")
    asked = {k: convert(k, v, types[k]) for k, v in asked.items()}
    if saved is None and "vocab_size" in asked:
        raise ConfigError(f"--vocab_size={asked['vocab_size']} cannot be set: the vocabulary comes from the data "
                          f"(its meta.json), so drop --vocab_size")
    settings = dict(preset)
    if saved is not None:
        settings.update(saved)
        for k in sorted(({f.name for f in fields(model_class)} - {"dropout"}) & asked.keys()):
            if asked[k] != saved.get(k):
                raise ConfigError(f"the checkpoint was trained with {k}={saved.get(k)!r}, not {asked[k]!r}: "
                                  f"drop --{k} to resume, or train from scratch into another --out_dir")
    settings.update(asked)
    train_cfg = train_class(**{f.name: settings[f.name] for f in fields(train_class) if f.name in settings})
    return train_cfg, {f.name: settings[f.name] for f in fields(model_class) if f.name in settings}


def merge_settings(configs, overrides, train_class, model_class):
    """train.main()'s arguments as one dict: whole config objects or dicts first, every field of an object counting
    (but a model config's vocab_size, which the data decides), then keywords, which win."""
    settings = {}
    for config in configs:
        if isinstance(config, dict):
            settings.update(config)
        elif isinstance(config, (train_class, model_class)):
            settings.update({f.name: getattr(config, f.name) for f in fields(config) if f.name != "vocab_size"})
        else:
            raise ConfigError(f"main() takes {train_class.__name__} or {model_class.__name__} objects or dicts, and "
                              f"keywords; got a {type(config).__name__}")
    return {**settings, **overrides}


def check_train_config(cfg):
    """Every training setting in its range, before any work: one ConfigError that says what to do."""
    require(cfg.dataset in ("shakespeare_char", "shakespeare"),
            f"--dataset must be shakespeare_char or shakespeare, got {cfg.dataset!r}")
    require(cfg.init_from in ("scratch", "resume"), f"--init_from must be scratch or resume, got {cfg.init_from!r}")
    require(cfg.dtype in ("auto", "float32", "bfloat16", "float16"),
            f"--dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")
    for name in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval"):
        require(getattr(cfg, name) >= 1, f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("max_iters", "warmup_iters", "lr_decay_iters", "sample_tokens"):
        require(getattr(cfg, name) >= 0, f"--{name} must be >= 0, got {getattr(cfg, name)}")
    require(cfg.learning_rate > 0 and 0 <= cfg.min_lr <= cfg.learning_rate,
            f"need 0 <= min_lr <= learning_rate and learning_rate > 0, got {cfg.min_lr} and {cfg.learning_rate}")
    for name in ("beta1", "beta2"):
        require(0 <= getattr(cfg, name) < 1, f"--{name} must be in [0, 1) (AdamW's moving averages; the usual "
                                              f"values are 0.9 and 0.99), got {getattr(cfg, name)}")
    require(cfg.grad_clip >= 0 and cfg.weight_decay >= 0, "--grad_clip and --weight_decay must be >= 0")
    require(cfg.peak_tflops >= 0, f"--peak_tflops must be >= 0 (0: look it up), got {cfg.peak_tflops}")
    require(0 <= cfg.seed < 2**63, f"--seed must be in [0, 2**63), got {cfg.seed}")


# -----------------------------------------------------------------------------
# devices: which one, DDP's shared verdicts, mixed precision


def pick_device(requested):
    """The device to run on: the one asked for, checked, or the best available (cuda, then mps, then cpu)."""
    import torch
    if requested:
        require(re.fullmatch(r"cpu|mps|cuda(:\d+)?", requested),
                f"--device={requested} is not a device: use cpu, cuda, cuda:N or mps (or leave it out)")
        require(not requested.startswith("cuda") or torch.cuda.is_available(),
                f"--device={requested} but no CUDA GPU is visible: use --device=cpu (or leave it out)")
        require(requested != "mps" or torch.backends.mps.is_available(),
                "--device=mps but MPS is not available here: use --device=cpu (or leave it out)")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def on_first_process(check, rank, world_size):
    """Run check() on the first DDP process only (it writes: the out_dir, the data), and give every process its
    verdict: all raise the same error, so that each ends with the same one line instead of the others waiting at the
    next collective until a timeout. A single process just runs check()."""
    error = None
    if rank == 0:
        try:
            check()
        except Exception as e:
            if world_size == 1:
                raise
            error = e
    if world_size > 1:
        import torch.distributed as dist
        verdict = [error if error is None or isinstance(error, UserError) else
                   UserError(f"the first process stopped: {type(error).__name__}: {first_reason(error)}")]
        dist.broadcast_object_list(verdict, src=0)
        if rank == 0 and error is not None:
            raise error
        if verdict[0] is not None:
            raise verdict[0]


def parameters_without_gradient(model, x, y):
    """The names of the parameters that one forward and backward pass on (x, y) leaves without a gradient (the random
    control's router: the noise picks the tokens). DDP must be told, or it stops at the second iteration waiting for
    their gradients. The random state is left as it was, and so are the gradients (none)."""
    import torch
    devices = [torch.cuda.current_device()] if x.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        _, loss = model(x, y)
        loss.backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    return unused


def pick_dtype(requested, device):
    """Mixed precision where it helps and is safe: bf16 needs compute capability >= 8.0 (A100, H100, L4, ...);
    older GPUs (Colab's T4) get float16 with a GradScaler; CPU and MPS train in float32. bfloat16 and float16 can
    be asked for on a CPU too (CPU autocast: rarely faster, but the mixed-precision path runs, and is tested, there)."""
    import torch
    if not device.startswith("cuda"):
        require(device != "mps" or requested in ("auto", "float32"),
                f"--dtype={requested} is for CUDA GPUs and CPUs; on mps use --dtype=float32 (or auto)")
        return "float32" if requested == "auto" else requested
    bf16_ok = torch.cuda.get_device_capability()[0] >= 8
    require(requested != "bfloat16" or bf16_ok,
            "this GPU has no fast bfloat16 (compute capability < 8.0): use --dtype=float16 or auto")
    return ("bfloat16" if bf16_ok else "float16") if requested == "auto" else requested


def autocast_for(dtype, device_type):
    """Mixed precision's context: torch.autocast in bf16/fp16 (the router and predictor stay in fp32 inside it), or
    nothing for float32."""
    import torch
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def allow_tf32():
    """float32 matrix products on a GPU's tensor cores (TF32: Ampere and later), with the API of the installed torch
    (fp32_precision since 2.9; the allow_tf32 flags before it, which 2.9 deprecates)."""
    import torch
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# -----------------------------------------------------------------------------
# command lines: one line for any error, exit statuses, SIGTERM, closed pipes


def describe_os_error(e):
    """An OSError in a few words, with the path it is about: "out/ckpt.pt: No space left on device"."""
    return f"{e.filename}: {e.strerror}" if e.filename else str(e.strerror or e)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `finally` runs (no temporary file is left behind)."""


def raise_terminated(signum, frame):
    raise Terminated


def quiet_stdout():
    """Whatever is still to print goes nowhere: stdout was closed by its reader (`python train.py | head`)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # so that Python's own flush at exit does not fail again
    os.close(devnull)


def is_out_of_memory(error):
    text = str(error)
    return isinstance(error, MemoryError) or any(s in text for s in ("out of memory", "can't allocate memory",
                                                                      "bad_alloc", "Cannot allocate memory"))


def unexpected(error, prog):
    """One line for an error nobody foresaw, with the full traceback written to a file whose path the line names
    (for a bug report). Out of memory says what to try instead."""
    import tempfile
    import traceback
    path = os.path.join(tempfile.gettempdir(), f"{os.path.splitext(os.path.basename(prog))[0]}-traceback-"
                                               f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt")
    try:
        with open(path, "w") as f:
            traceback.print_exception(error, file=f)
        where = f"the full traceback is in {path}"
    except OSError:
        where = "no traceback file could be written"
    if is_out_of_memory(error):
        return (f"out of memory ({first_reason(error)[:200]}): try a smaller --batch_size (or --block_size, "
                f"--n_embd, --num_samples, --max_new_tokens); {where}")
    return (f"unexpected {type(error).__name__}: {first_reason(error)[:300]}; {where} (please include it in a "
            f"bug report)")


def run_cli(main, on_interrupt="stopped"):
    """Run a command line's main(): whatever it reports (a UserError or a ValueError) ends as one line "error: ..."
    on stderr and exit status 1, never a traceback; so does an OSError, naming its path, and, last resort, any other
    exception (unexpected(): its traceback goes to a file). Ctrl-C prints on_interrupt and exits with 130, SIGTERM
    with 143 (128 + the signal, the shells' convention), both after every `finally` ran; a closed stdout ends the
    printing quietly, with 141 (SIGPIPE's). Returns main()'s result."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)
    try:
        return main()
    except (UserError, ValueError) as e:
        message = str(e)
    except BrokenPipeError:
        quiet_stdout()
        sys.exit(128 + signal.SIGPIPE)
    except OSError as e:  # anything not caught closer to its cause: still one line, naming the path
        message = f"{describe_os_error(e)}: check the path, its permissions and the free disk space"
    except KeyboardInterrupt as e:
        print(on_interrupt, file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    except Exception as e:  # the last resort: nobody foresaw it
        message = unexpected(e, sys.argv[0])
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


# -----------------------------------------------------------------------------
# files


def write_atomically(files, describe=None):
    """Write files {path: write(temporary_path)} all or nothing, as far as a filesystem allows. Each file is written
    to a temporary name of its own beside its path (process id and random digits: two runs writing the same path
    never touch each other's temporary file); only when every write succeeded are they renamed into place, in order.
    os.replace is atomic, so each path holds either its complete new file or its old one, never half a file, even
    after a crash, a full disk or Ctrl-C. With several files the last one's old copy is removed before the renames,
    so that the last file marks a complete set (a dataset's meta.json). A failed write raises what describe(path,
    reason) returns (without describe, the error itself); no temporary file is left behind."""
    temporary = {path: f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp" for path in files}
    try:
        for path, write in files.items():
            try:
                write(temporary[path])
            except (OSError, RuntimeError) as e:  # a full disk is a RuntimeError from inside torch.save
                if describe is None:
                    raise
                raise describe(path, first_reason(e)) from None
        last = list(files)[-1]
        if len(files) > 1 and os.path.exists(last):
            os.remove(last)
        for path in files:
            os.replace(temporary[path], path)
    finally:
        for tmp in temporary.values():  # a write or rename failed (or Ctrl-C): leave nothing behind
            if os.path.exists(tmp):
                os.remove(tmp)


def check_writable(folder):
    """Create and delete a file in folder, as a save will: an OSError if we cannot. (os.access only guesses from the
    permission bits, which e.g. root or some network filesystems do not follow.)"""
    probe = os.path.join(folder, f".write-test.{os.getpid()}")
    with open(probe, "wb"):
        pass
    os.remove(probe)


# -----------------------------------------------------------------------------
# checkpoints

# what train.py needs to resume; sample.py needs only the model, its config and the meta
RESUME_KEYS = ("model", "optimizer", "scaler", "model_config", "train_config", "meta", "iter_num", "best_val_loss",
               "rng_state")


def load_checkpoint(path, need=RESUME_KEYS):
    """A checkpoint written by train.py, checked: one CheckpointError naming the file and what to do if it cannot
    be read, lacks something we need, or holds NaN/inf weights. torch.load(weights_only=True) reads tensors and
    plain data only: it never runs code stored in the file (a pickle can otherwise run anything)."""
    import torch

    from data.prepare import meta_problem
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror}): check the path and its permissions") from None
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}): it may be corrupt or from "
                              f"another program; delete it or train into another --out_dir") from None
    missing = [key for key in need if key not in ckpt] if isinstance(ckpt, dict) else list(need)
    require(not missing, f"{path} is not a checkpoint of this train.py (missing {missing}): train into another "
                         f"--out_dir", CheckpointError)
    damaged = [key for key in ("model", "optimizer", "scaler", "model_config", "train_config", "meta", "rng_state")
               if key in need and not isinstance(ckpt[key], dict)]
    require(not damaged, f"{path} is damaged ({damaged and damaged[0]} is no dict): train into another --out_dir",
            CheckpointError)
    problem = meta_problem(ckpt["meta"]) if "meta" in need else None
    if not problem and "meta" in need and "model_config" in need:
        vocab_sizes = ckpt["meta"]["vocab_size"], ckpt["model_config"].get("vocab_size")
        if vocab_sizes[0] != vocab_sizes[1]:
            problem = "has a vocabulary of %s tokens, the model %s" % vocab_sizes
    require(not problem, f"the meta of {path} {problem}: the file is damaged; train into another --out_dir",
            CheckpointError)
    if "iter_num" in need:
        require(is_int(ckpt["iter_num"]) and ckpt["iter_num"] >= 0 and isinstance(ckpt["best_val_loss"], (int, float))
                and not isinstance(ckpt["best_val_loss"], bool) and not math.isnan(ckpt["best_val_loss"]),
                f"{path} is damaged (iter_num {ckpt['iter_num']!r}, best_val_loss {ckpt['best_val_loss']!r}): train "
                f"into another --out_dir", CheckpointError)
    for name, tensor in ckpt["model"].items():
        require(not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or torch.isfinite(tensor).all(),
                f"{path} holds non-finite weights (NaN or inf, in {name}): it cannot be used; use the other "
                f"checkpoint in its folder (ckpt.pt or best.pt) or train again", CheckpointError)
    return ckpt


def save_checkpoint(path, state):
    """torch.save(state) to path, atomically (write_atomically): the previous file survives any failure."""
    import torch

    def failed(path, reason):
        return CheckpointError(f"cannot write {path} ({reason}): free some disk space or choose another --out_dir; "
                               f"the previous {os.path.basename(path)} is untouched")
    write_atomically({path: lambda tmp: torch.save(state, tmp)}, failed)


def weights_are_finite(state_dict):
    """No NaN or inf in any weight or buffer. Reads every tensor (a sync on a GPU): only before a save."""
    return all(t.isfinite().all() for t in state_dict.values() if t.is_floating_point())


class Checkpoints:
    """The checkpoint policy of a training run, all of it. In out_dir:

      ckpt.pt   the latest state, written at every evaluation and when a run is stopped: what --init_from=resume
                continues, exactly (weights, optimizer, scaler, random state, iteration; state() and restore())
      best.pt   the model with the lowest validation loss so far: what sample.py loads (to_sample())

    - A scratch run refuses an out_dir that holds either (check()), unless asked: overwrite=True removes both when
      the run starts (start_over()), not half of them later.
    - Nothing is saved with NaN/inf weights: save() returns no path and every file stays as it was.
    - best.pt is never replaced by a worse model. ckpt.pt is written first, so if best.pt's write then fails, ckpt.pt's
      best_val_loss is too low rather than too high, and a resumed run cannot replace best.pt with a worse model.
    - Every write is atomic (save_checkpoint); train.py holds signals back while it saves (StopSignals).
    - An evaluation-only run writes nothing."""

    def __init__(self, out_dir):
        require(out_dir, "--out_dir is empty: name a folder for the checkpoints, e.g. --out_dir=out")
        require(not os.path.exists(out_dir) or os.path.isdir(out_dir),
                f"--out_dir={out_dir} is a file, not a folder: choose another --out_dir")
        self.out_dir = out_dir
        self.latest = os.path.join(out_dir, "ckpt.pt")
        self.best = os.path.join(out_dir, "best.pt")
        self.best_val_loss = float("inf")

    def load_latest(self, train_class, model_class):
        """ckpt.pt to resume from, checked (load_checkpoint), its settings too: they go through the conversion and
        the checks of the user's flags, so a checkpoint that does not hold together is one CheckpointError naming the
        file and the field. Sets the best validation loss so far."""
        require(os.path.exists(self.latest), f"--init_from=resume but there is no checkpoint at {self.latest}: "
                                             f"train one first (python train.py --out_dir={self.out_dir})")
        ckpt = load_checkpoint(self.latest)
        for part, config in (("train_config", train_class), ("model_config", model_class)):
            types = {f.name: f.type for f in fields(config)}
            try:
                values = {k: convert(k, v, types[k]) for k, v in ckpt[part].items() if k in types}
                checked = config(**values)  # the dataclass's defaults fill in fields of a later version
                if config is train_class:
                    check_train_config(checked)
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"{self.latest} is damaged: its {part} does not hold together ("
                                      f"{str(e).replace('--', '')}); train into another --out_dir") from None
            ckpt[part] = dataclasses.asdict(checked)
        self.best_val_loss = ckpt["best_val_loss"]
        return ckpt

    def saved_settings(self, ckpt):
        """The settings a resume continues with, under what the user asks: the checkpoint's, but not the machine's
        (device, compile, peak_tflops), which are this run's like the device itself."""
        machine = ("device", "compile", "peak_tflops")
        return {**{k: v for k, v in ckpt["train_config"].items() if k not in machine}, **ckpt["model_config"],
                "init_from": "resume", "out_dir": self.out_dir}

    def check(self, init_from, overwrite, eval_only):
        """Before any work: out_dir must be a folder we can write to, and a scratch run must not replace the
        checkpoints of an earlier run unless asked to. An evaluation-only run writes nothing: no checks."""
        if eval_only:
            return
        found = [os.path.basename(path) for path in (self.latest, self.best) if os.path.exists(path)]
        require(init_from == "resume" or not found or overwrite,
                f"{self.out_dir} already holds {' and '.join(found)} of an earlier run, which a new run would "
                f"replace: continue it with --init_from=resume, train into another --out_dir, or start over with "
                f"--overwrite=True")
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            check_writable(self.out_dir)
        except OSError as e:
            raise ConfigError(f"cannot write to --out_dir={self.out_dir} ({e.strerror}): choose a folder you can "
                              f"write to") from None

    @contextmanager
    def run(self, start_over=False, enabled=True):
        """While a run writes into out_dir: out_dir is locked, so that a second run there (a resume, or a scratch run
        started at the same time) is refused in one line naming the process that holds it; start_over
        (overwrite=True) removes the earlier run's checkpoints, both of them, once the folder is ours. The lock is
        an flock on the folder itself: no file is created, and the kernel drops it when the process ends, however it
        ends, so a crashed run never blocks the next one. POSIX only (elsewhere, no lock). enabled=False (other DDP
        processes, an evaluation-only run): nothing."""
        fd = self.lock() if enabled else None
        try:
            for path in (self.latest, self.best) if enabled and start_over else ():
                if os.path.exists(path):
                    os.remove(path)
                    print(f"removed {path} of an earlier run (--overwrite=True)")
            yield
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock

    def lock(self):
        try:
            import fcntl
        except ImportError:  # not POSIX
            return None
        fd = os.open(self.out_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f"{self.out_dir} is in use by another run ({lock_holder(self.out_dir)}): wait for it to "
                              f"finish or stop it, or train into another --out_dir") from None
        return fd

    @staticmethod
    def state(model, optimizer, scaler, model_config, train_config, meta, iter_num, rng):
        """What ckpt.pt holds (RESUME_KEYS but best_val_loss, which save() adds): the state at the top of iteration
        iter_num, rng being the random state there, where a resume starts."""
        return dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                    model_config=dataclasses.asdict(model_config), train_config=dataclasses.asdict(train_config),
                    meta=meta, iter_num=iter_num, rng_state=rng)

    def restore(self, ckpt, model, optimizer, scaler, random_state=True):
        """Load a checkpoint's state into a freshly built model, optimizer and GradScaler, and the random state (when
        random_state: one process; dropout and the random control then continue exactly). Returns iter_num."""
        import torch
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt["scaler"] and scaler.is_enabled():  # the GradScaler's state; empty when trained in bf16/fp32
                scaler.load_state_dict(ckpt["scaler"])
            if random_state:
                torch.set_rng_state(ckpt["rng_state"]["cpu"])
                if "cuda" in ckpt["rng_state"] and torch.cuda.is_available():
                    torch.cuda.set_rng_state(ckpt["rng_state"]["cuda"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self.latest} does not fit this model ({first_reason(e)}): train from scratch "
                                  f"into another --out_dir") from None
        return ckpt["iter_num"]

    def save(self, state, val_loss, signals):
        """Save the training state (state()) to ckpt.pt, and to best.pt too when val_loss is the best so far;
        val_loss=None (a stopped run) saves ckpt.pt alone. Signals wait until the save is done. Returns the paths
        written: none if a weight is NaN or inf (which reads every weight: a sync on a GPU, so only here)."""
        if not weights_are_finite(state["model"]):
            return []
        paths = [self.latest]
        if val_loss is not None and val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            paths.append(self.best)
        state = dict(state, best_val_loss=self.best_val_loss)
        with signals.save_in_progress():
            for path in paths:
                save_checkpoint(path, state)
        return paths

    def save_and_stop(self, state, signals, why=""):
        """A run that stops before its end (a signal, a closed stdout, an error) saves ckpt.pt, the state at the top
        of the iteration where it stopped, and says how to continue."""
        saved = self.save(state, None, signals)
        print(why + (f"saved {self.latest}; continue with --init_from=resume --out_dir={self.out_dir}" if saved else
                     f"not saved: the weights are not finite (NaN or inf) at iteration {state['iter_num']}; "
                     f"{self.latest} keeps the last good state (resume with a lower --learning_rate)"))

    @staticmethod
    def to_sample(out_dir, which="best"):
        """The checkpoint sample.py loads: best.pt (ckpt.pt, with a note, before training has written one) or, with
        which="latest", ckpt.pt."""
        require(which in ("best", "latest"), f"--checkpoint must be best or latest, got {which!r}")
        best, latest = os.path.join(out_dir, "best.pt"), os.path.join(out_dir, "ckpt.pt")
        path = best if which == "best" else latest
        if which == "best" and not os.path.exists(best) and os.path.exists(latest):
            print(f"note: no best.pt in {out_dir} yet (training writes it at its first evaluation): sampling from "
                  f"ckpt.pt, where training stopped")
            path = latest
        require(os.path.isfile(path), f"no checkpoint at {path}: train one with python train.py (it writes "
                                      f"out/best.pt and out/ckpt.pt), or point --out_dir at the folder that holds it")
        return path


def lock_holder(folder):
    """Who holds the flock on folder: "process 1234: python train.py ..." from /proc (Linux), else "another
    process"."""
    try:
        inode = os.stat(folder).st_ino
        with open("/proc/locks") as f:
            for line in f:  # "1: FLOCK  ADVISORY  WRITE 1234 00:2e:5678 0 EOF"
                parts = line.split()
                if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(inode):
                    with open(f"/proc/{parts[4]}/cmdline", "rb") as cmd:
                        command = cmd.read().replace(b"\0", b" ").decode(errors="replace").strip()
                    return f"process {parts[4]}: {command[:100]}"
    except (OSError, ValueError):
        pass
    return "another process"


def random_state(device_type):
    """torch's random state now (and the GPU's), as a checkpoint stores it."""
    import torch
    state = dict(cpu=torch.get_rng_state())
    if device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


@contextmanager
def stop_on_bad_loss(ckpt_path):
    """A NaN/inf loss (a FloatingPointError) stops training with one message, before anything is saved."""
    try:
        yield
    except FloatingPointError as e:
        raise SystemExit(f"stopping: {e}. The last good checkpoint (if any) is untouched in {ckpt_path}; "
                         f"try a lower --learning_rate or --dtype=float32") from None


# -----------------------------------------------------------------------------
# signals


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (sent by `timeout`, job schedulers, a notebook's shutdown) while training.

    The first one only raises a flag: the loop finishes the current iteration, saves ckpt.pt and stops, so the
    checkpoint never holds half an iteration and a resume continues exactly. A second one stops at once, without
    saving, except in the middle of a save: a save in progress always finishes first (a half-written file would be
    thrown away, and with it everything since the last save). A closed stdout (`python train.py | grep -m1 saved`)
    counts as one too, "SIGPIPE": printing stops quietly, the run saves and stops. Single process only: under DDP
    every process gets the signal at its own time, so there the usual behaviour stays (enabled=False)."""

    def __init__(self, enabled=True):
        self.enabled = enabled
        self.received = None  # the first signal's name ("SIGINT" or "SIGTERM"), once one has come
        self.saving = False
        self.again = False  # a second signal came during a save
        self.previous = {}

    def __enter__(self):
        if self.enabled and threading.current_thread() is threading.main_thread():  # handlers live in the main thread
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handler)
            self.stdout, sys.stdout = sys.stdout, ClosedPipeGuard(sys.stdout, self)
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
        if self.previous:
            sys.stdout = self.stdout


class ClosedPipeGuard:
    """sys.stdout while training: when its reader has gone (BrokenPipeError), printing stops quietly and the run is
    asked to stop, as by a signal."""

    def __init__(self, stream, signals):
        self.stream, self.signals = stream, signals

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.closed()

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.closed()

    def closed(self):
        quiet_stdout()
        self.signals.received = self.signals.received or "SIGPIPE"

    def __getattr__(self, name):
        return getattr(self.stream, name)



# -----------------------------------------------------------------------------
# metrics

# dense bf16 (float16 for V100 and T4) tensor-core peaks, for MFU; matched as whole words of the GPU's name, in this
# order (the PCIe H100 before the SXM one)
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10": 125.0,
               "V100": 125.0, "T4": 65.0}


def format_eval(it, ev):
    """The log line of train.evaluate's results at iteration it."""
    line = f"step {it}: train loss {ev['train_topk']:.4f}, val loss {ev['val_topk']:.4f}"
    if "val_predictor" in ev:
        line += f" (top-k), val loss {ev['val_predictor']:.4f} (causal predictor), predictor " + predictor_text(ev)
    return line


def predictor_text(values):
    """The predictor's scores against top-k for a log line: accuracy, and what accuracy hides (mod.predictor_scores)."""
    accuracy, balanced, precision, recall = (100 * values[f"predictor_{k}"]
                                             for k in ("accuracy", "balanced", "precision", "recall"))
    return f"accuracy {accuracy:.1f}% (balanced {balanced:.1f}%, precision {precision:.1f}%, recall {recall:.1f}%)"


def peak_flops(peak_tflops, device):
    """The device's peak FLOP/s for MFU: peak_tflops if given, else looked up for known GPUs, else None (no MFU)."""
    if peak_tflops > 0:
        return peak_tflops * 1e12
    if device.startswith("cuda"):
        import torch
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS.items():
            if re.search(rf"\b{key}\b", name):  # "NVIDIA A100-SXM4-80GB" is an A100; "NVIDIA A10G" is no A10
                return tflops * 1e12
    return None


class Clock:
    """Training time: wall-clock seconds with evaluations and saves left out (paused()), the fair clock for
    comparing models; and ms per iteration after the first step (warm-up and compilation left out)."""

    def __init__(self):
        self.start = self.last = time.time()
        self.paused_s = 0.0
        self.warm = None  # (time, paused_s) when the first step was done

    @contextmanager
    def paused(self):
        t0 = time.time()
        try:
            yield
        finally:
            spent = time.time() - t0
            self.paused_s += spent
            self.last += spent  # the next lap times training only

    def step_done(self):
        if self.warm is None:
            self.warm = (time.time(), self.paused_s)

    def lap(self, steps):
        """Seconds per step over the last `steps` steps, since the previous lap."""
        now = time.time()
        dt, self.last = (now - self.last) / steps, now
        return dt

    def times(self):
        """(training seconds, wall seconds) so far, as Metrics records them."""
        now = time.time()
        return now - self.start - self.paused_s, now - self.start

    def ms_per_iter(self, steps):
        """Training time per step over `steps` steps, the first one left out; 0 with fewer than 2."""
        if self.warm is None or steps < 2:
            return 0.0
        return 1000 * (time.time() - self.warm[0] - (self.paused_s - self.warm[1])) / (steps - 1)


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
    """The run's history for plotting: every log line and every evaluation as one dict (train.main() returns the
    list), also written as a line of JSON to out_dir/metrics.jsonl. time_s is training time, evaluations and saving
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
        if self.write:
            write_atomically({self.path: self.write_history})

    def write_history(self, path):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.history)

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
