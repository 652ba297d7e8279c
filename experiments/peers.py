"""
Our models against nanoGPT and five public Mixture-of-Depths implementations, side by side in one process: the
training step (forward, backward, AdamW) and the forward alone. It reproduces the table of docs/results.md, "Against
nanoGPT and other MoD code". Each peer is imported at run time from its own checkout, whose path you pass; nothing of
theirs is copied here.

Get the checkouts (anywhere; distinct folder names, since two of the repositories share a name):

    git clone https://github.com/karpathy/nanoGPT peers/nanoGPT
    git clone https://github.com/EduardoPach/nanoMoD peers/nanoMoD
    git clone https://github.com/kyegomez/Mixture-of-Depths peers/kyegomez
    git clone https://github.com/sramshetty/mixture-of-depths peers/sramshetty
    git clone https://github.com/astramind-ai/Mixture-of-depths peers/astramind
    git clone https://github.com/Mixture-AI/Mixture-of-Depths peers/mixture_ai

and run, from the repository root (a few minutes on 2 cores):

    python experiments/peers.py --nanogpt=peers/nanoGPT --nanomod=peers/nanoMoD --kyegomez=peers/kyegomez \
        --sramshetty=peers/sramshetty --astramind=peers/astramind --mixture_ai=peers/mixture_ai
    [--shapes=cpu,shakespeare_char] [--rounds=6] [--out_dir=bench_runs/peers]

A peer left out is skipped with a note; a missing checkout or a failed import is one line that says what to do, and
the others still run. sramshetty's routed layer is a Llama 2 block: it needs `pip install einops fairscale
sentencepiece` and Meta's llama package (git clone https://github.com/meta-llama/llama && pip install -e llama).
Modules that a peer's file imports but the measured classes never call (kyegomez: zeta; nanoMoD: wandb, pandas,
hydra; astramind: transformers) are replaced by placeholders where they are not installed, with a note.

The models, on the same random batch (vocab 65), at bench.SHAPES (cpu: 4 x 128, block 64, batch 12;
shakespeare_char: 6 x 384, block 256, batch 8):
- ours: the dense model (mod_every=0) and MoD (capacity 12.5%, every other block routed), as bench.py builds them;
- over our dense: nanoGPT's GPT (its model.py; dropout 0, no bias) and bench.TextbookGPT;
- over our MoD: each peer's routed layer at 12.5% in one shared skeleton (SkeletonGPT: nanoGPT's embeddings, blocks,
  final LayerNorm and tied head), routed on blocks 1, 3, ...; the other blocks are mod.Block, and so is the block
  that a peer's layer wraps where it takes one. A peer's auxiliary loss is in the step where its own code trains it
  by default; kyegomez's optional predictor is measured both ways.
Timing: fused AdamW (train.configure_optimizer), 2 threads, `rounds` interleaved rounds (every model once per round,
in turn, as bench.interleaved_times); the forward is timed under no_grad in training mode (the same top-k routing as the
step). Reported: each model's median time over ours, and for the step the spread [min-max] of the per-round ratios.
It writes out_dir/peers.md (the table, the command, the commits) and out_dir/peers.json, and prints the table.
"""

import argparse
import contextlib
import functools
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from anywhere: bench.py, train.py and mod.py live one folder up

import bench  # noqa: E402
import train  # noqa: E402
from mod import Block, MoDConfig, MoDGPT  # noqa: E402

VOCAB = bench.VOCAB  # 65: shakespeare_char's characters
CAPACITY = 0.125
THREADS = 2


# -----------------------------------------------------------------------------
# The peers: where each lives, what to import, and how to fix a failed import


@dataclass
class Peer:
    key: str  # the command-line option, --key=PATH
    name: str  # as the table names it
    url: str
    file: str  # the file to import, in the checkout
    package_root: str = ""  # a folder of the checkout that its own imports need on sys.path ("" = the checkout)
    install: str = ""  # the fix for a missing dependency ("" = pip install the missing module)
    placeholders: tuple = ()  # modules the file imports but the measured classes never call


PEERS = {p.key: p for p in [
    Peer("nanogpt", "nanoGPT", "https://github.com/karpathy/nanoGPT", "model.py"),
    Peer("nanomod", "nanoMoD", "https://github.com/EduardoPach/nanoMoD", "src/nanomod/model.py", package_root="src",
         placeholders=("wandb", "pandas", "hydra.core.config_store")),  # training utilities and its config store
    Peer("kyegomez", "kyegomez/Mixture-of-Depths", "https://github.com/kyegomez/Mixture-of-Depths",
         "mixture_of_depths/main.py", placeholders=("zeta.nn",)),  # for a block that MoD does not use
    Peer("sramshetty", "sramshetty/mixture-of-depths", "https://github.com/sramshetty/mixture-of-depths",
         "mixture_of_depths/routing_transformer.py",
         install="pip install einops fairscale sentencepiece; and Meta's llama: "
                 "git clone https://github.com/meta-llama/llama && pip install -e llama"),
    # MoD/MoD.py itself: the package's __init__ also imports its Hugging Face model zoo, which MoD does not need
    Peer("astramind", "astramind-ai/Mixture-of-depths", "https://github.com/astramind-ai/Mixture-of-depths",
         "MoD/MoD.py", placeholders=("transformers",)),  # PreTrainedModel, DynamicCache: type hints, apply_mod_to_hf
    Peer("mixture_ai", "Mixture-AI/Mixture-of-Depths", "https://github.com/Mixture-AI/Mixture-of-Depths",
         "MoD/MoD.py"),
]}


class Unavailable:
    """What a placeholder module holds: any name, which fails only if it is called."""

    def __init__(self, *args, **kwargs):
        raise ImportError(f"{type(self).__name__} is a placeholder: its package is not installed")


class PlaceholderModule(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (Unavailable,), {})


PIP_NAMES = {"zeta": "zetascale", "hydra": "hydra-core"}  # where the package's name differs from its module's


@contextlib.contextmanager
def placeholders(names, notes, peer):
    """Stand-ins in sys.modules for the modules of `names` that are not installed, while the peer's file imports;
    one note for them all."""
    missing = [name for name in names if importlib.util.find_spec(name.split(".")[0]) is None]
    added = []
    for name in missing:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            sub = ".".join(parts[:i])
            if sub not in sys.modules:
                sys.modules[sub] = PlaceholderModule(sub)
                added.append(sub)
    if missing:
        tops = [name.split(".")[0] for name in missing]
        notes.append(f"{peer.name}: {', '.join(tops)} not installed; its code imports but the measured classes never "
                     f"call {'them' if len(tops) > 1 else 'it'}, so placeholders stand in (the real ones: pip install "
                     f"{' '.join(PIP_NAMES.get(t, t) for t in tops)})")
    try:
        yield
    finally:
        for sub in added:
            sys.modules.pop(sub, None)


def import_peer(peer, checkout, notes):
    """The peer's file as a module, imported from its checkout under a name of its own (peers_<key>). The checkout's
    own packages (nanoMoD's nanomod) are dropped from sys.modules afterwards, so that two checkouts never mix."""
    root = os.path.abspath(os.path.join(checkout, peer.package_root))
    path = os.path.join(os.path.abspath(checkout), peer.file)
    name = f"peers_{peer.key}"
    before = set(sys.modules)
    sys.path.insert(0, root)
    try:
        with placeholders(peer.placeholders, notes, peer):
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses look their module up there
            spec.loader.exec_module(module)
        return module
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.path.remove(root)
        for key in set(sys.modules) - before - {name}:
            if os.path.abspath(getattr(sys.modules[key], "__file__", None) or "/").startswith(root + os.sep):
                del sys.modules[key]


def load_peers(paths, notes):
    """{key: module} for the peers whose checkout imports; one note for each peer skipped, with its fix."""
    loaded = {}
    for key, peer in PEERS.items():
        path = paths.get(key)
        if not path:
            notes.append(f"{peer.name}: skipped, no --{key}=PATH (git clone {peer.url} PATH)")
        elif not os.path.exists(path):
            notes.append(f"{peer.name}: skipped, no checkout at {path} (git clone {peer.url} {path})")
        elif not os.path.isfile(os.path.join(path, peer.file)):
            notes.append(f"{peer.name}: skipped, {path} has no {peer.file}: is it a checkout of {peer.url}?")
        else:
            try:
                loaded[key] = import_peer(peer, path, notes)
            except ModuleNotFoundError as e:
                notes.append(f"{peer.name}: skipped, importing {peer.file} from {path} failed: {e} "
                             f"({peer.install or f'pip install {e.name}'})")
            except Exception as e:
                notes.append(f"{peer.name}: skipped, importing {peer.file} from {path} failed: "
                             f"{type(e).__name__}: {e}")
    return loaded


def commit_of(path):
    """The commit a checkout is at ('unknown' if it is no git repository), marked if it has changes."""
    def git(*args):
        return subprocess.run(["git", "-C", path, *args], capture_output=True, text=True, timeout=30)
    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


# -----------------------------------------------------------------------------
# One GPT skeleton around each peer's routed layer. Each layer adapter returns x, or (x, auxiliary loss).


class SkeletonGPT(nn.Module):
    """nanoGPT's GPT (token + position embeddings, blocks, final LayerNorm, tied LM head, its init) with routed(i)
    as blocks 1, 3, ... and mod.Block as the others. forward(idx, targets) -> (logits, loss + auxiliary losses)."""

    def __init__(self, dims, routed):
        super().__init__()
        C = dims["n_embd"]
        self.wte = nn.Embedding(VOCAB, C)
        self.wpe = nn.Embedding(dims["block_size"], C)
        self.h = nn.ModuleList([routed(i) if i % 2 else Block(block_config(dims)) for i in range(dims["n_layer"])])
        self.ln_f = nn.LayerNorm(C, bias=False)
        self.lm_head = nn.Linear(C, VOCAB, bias=False)
        self.wte.weight = self.lm_head.weight
        for m in self.modules():  # nanoGPT's _init_weights
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        aux = 0.0
        for block in self.h:
            x = block(x)
            if isinstance(x, tuple):
                x, loss = x
                aux = aux + loss
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1)) + aux


def block_config(dims):
    return MoDConfig(vocab_size=VOCAB, mod_every=0, dropout=0.0, **dims)


class NanoMoDLayer(nn.Module):
    """nanoMoD: its MoDBlock, a whole nanoGPT block with its router inside (it wraps no block), and the router BCE
    against the top-k that its GPT adds to the loss whenever there are targets (GPT.compute_aux_loss)."""
    NOT_DNAS = types.SimpleNamespace(is_dnas=False)  # the one attribute compute_aux_loss reads from its GPT

    def __init__(self, peer, dims):
        super().__init__()
        cfg = peer.GPTConfig(vocab_size=VOCAB, dropout=0.0, bias=False, capacity_ratio=CAPACITY, **dims)
        self.layer = peer.MoDBlock(cfg)
        self.aux_loss = peer.GPT.compute_aux_loss

    def forward(self, x):
        x, router_logits, selected = self.layer(x)
        return x, self.aux_loss(self.NOT_DNAS, (router_logits,), (selected,), x.size(1))


class KyegomezLayer(nn.Module):
    """kyegomez: MoD wrapping a mod.Block; with aux, its auxiliary predictor's BCE (off by default in its code)."""

    def __init__(self, peer, dims, aux):
        super().__init__()
        self.layer = peer.MoD(seq_len=dims["block_size"], dim=dims["n_embd"], capacity_factor=CAPACITY,
                              transformer_block=Block(block_config(dims)), aux_loss_on=aux)

    def forward(self, x):
        with contextlib.redirect_stdout(io.StringIO()):  # its forward prints the routed tokens' shape every call
            return self.layer(x)


class SramshettyLayer(nn.Module):
    """sramshetty: its MoDBlock is a whole Llama 2 block (RMSNorm, rotary attention, SwiGLU, fairscale's Linears) with
    the routing inside; it wraps no block, so it is used as it is, with one router shared by all routed blocks as in
    its MoDTransformer. Its defaults train no auxiliary loss (its predictor is trained in a later phase)."""

    def __init__(self, peer, dims, i, router, batch):
        super().__init__()
        T, C, H = dims["block_size"], dims["n_embd"], dims["n_head"]
        args = peer.ModelArgs(dim=C, n_layers=dims["n_layer"], n_heads=H, vocab_size=VOCAB, max_batch_size=batch,
                              max_seq_len=T, capacity=int(CAPACITY * T))
        self.layer = peer.MoDBlock(i, args, router, None)
        self.register_buffer("freqs_cis", peer.precompute_freqs_cis(C // H, 2 * T), persistent=False)

    def forward(self, x):
        return self.layer(x, 0, self.freqs_cis[:x.size(1)], None)[0]


def model_parallel(peer):
    """fairscale's model parallelism of one process, which sramshetty's layers need (as its notebooks set up)."""
    if not torch.distributed.is_initialized():
        store = tempfile.NamedTemporaryFile(prefix="peers_dist_", delete=False).name
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    if not peer.fs_init.model_parallel_is_initialized():
        peer.fs_init.initialize_model_parallel(1)


class HFStyleBlock(Block):
    """mod.Block as astramind's MoD calls a Hugging Face decoder layer: a hidden_size, keyword arguments (attention
    mask, positions, cache: unused here, the block is causal and positions are in the embeddings), a tuple back."""

    def __init__(self, config):
        super().__init__(config)
        self.hidden_size = config.n_embd

    def forward(self, x, **hf_kwargs):
        return (super().forward(x),)


class AstramindLayer(nn.Module):
    """astramind: MoD wrapping a mod.Block. In training its capacity anneals from 1 to 0.125 + 0.875 / step over
    its first 1000 steps; it starts past them here, so that it routes 12.5% from the first step like the others."""

    def __init__(self, peer, dims):
        super().__init__()
        self.layer = peer.MoD(CAPACITY, HFStyleBlock(block_config(dims)))
        self.layer.training_step = 1000

    def forward(self, x):
        B, T, _ = x.shape
        pos = torch.arange(T, device=x.device).expand(B, T)
        return self.layer(x, attention_mask=None, position_ids=pos, past_key_value=None, output_attentions=False,
                          use_cache=False)[0]


class MixtureAILayer(nn.Module):
    """Mixture-AI: MoDTransformerBlock wrapping a mod.Block; in training its forward computes its predictor's BCE
    and keeps it (self.aux_loss) for the backward pass, so the step includes it."""

    def __init__(self, peer, dims):
        super().__init__()
        self.layer = peer.MoDTransformerBlock(Block(block_config(dims)), hidden_size=dims["n_embd"],
                                              capacity=CAPACITY)

    def forward(self, x):
        out = self.layer(x)
        return (out, self.layer.aux_loss) if self.training else out


# -----------------------------------------------------------------------------
# The models of one shape, and their timing


def model_makers(peers, dims, batch):
    """[(label, baseline, make)]: ours first, then each model measured against "dense" or "MoD" (make None: the
    textbook GPT, built from our dense model's weights as in bench.speed)."""
    makers = [("our dense", None, lambda: bench.build(dims, 0, "cpu")),
              ("our MoD", None, lambda: bench.build(dims, 2, "cpu"))]
    if "nanogpt" in peers:
        p = peers["nanogpt"]
        cfg = p.GPTConfig(vocab_size=VOCAB, dropout=0.0, bias=False, **dims)
        makers.append(("nanoGPT's GPT, over our dense", "dense", lambda: p.GPT(cfg)))
    makers.append(("the textbook GPT, over our dense", "dense", None))

    def skeleton(layer, *args):  # make(peer module): SkeletonGPT with layer(peer, dims, *args) on blocks 1, 3, ...
        return lambda p: SkeletonGPT(dims, lambda i: layer(p, dims, *args))

    mod_peers = {  # key: [(label, make(peer module))]
        "nanomod": [("nanoMoD (EduardoPach; trains a router BCE), over our MoD", skeleton(NanoMoDLayer))],
        "kyegomez": [("kyegomez/Mixture-of-Depths", skeleton(KyegomezLayer, False)),
                     ("kyegomez, with its auxiliary predictor", skeleton(KyegomezLayer, True))],
        "sramshetty": [("sramshetty/mixture-of-depths", lambda p: sramshetty_model(p, dims, batch))],
        "astramind": [("astramind-ai/Mixture-of-depths", skeleton(AstramindLayer))],
        "mixture_ai": [("Mixture-AI/Mixture-of-Depths", skeleton(MixtureAILayer))],
    }
    for key, entries in mod_peers.items():
        if key in peers:
            makers += [(label, "MoD", functools.partial(make, peers[key])) for label, make in entries]
    return makers


def sramshetty_model(peer, dims, batch):
    model_parallel(peer)
    router = nn.Linear(dims["n_embd"], 1, bias=False)  # as its MoDTransformer: one router, given to every layer
    return SkeletonGPT(dims, lambda i: SramshettyLayer(peer, dims, i, router, batch))


def step_and_forward(model, x, y):
    """The training step (as bench.train_steps: forward, backward, fused AdamW) and the forward under no_grad, both
    in training mode, each run once here (warm-up, and a check that the model gives a finite loss)."""
    model.train()
    opt = train.configure_optimizer(model, train.TrainConfig(learning_rate=1e-4), "cpu")
    kwargs = dict(check_input=False) if isinstance(model, MoDGPT) else {}  # ours, as train.py calls them

    def step():
        _, loss = model(x, y, **kwargs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward():
        return model(x, y, **kwargs)

    logits, loss = forward()
    if logits.shape != (*x.shape, VOCAB) or not torch.isfinite(loss):
        raise ValueError(f"logits {tuple(logits.shape)}, loss {loss.item()}: expected ({x.shape[0]}, {x.shape[1]}, "
                         f"{VOCAB}) and a finite loss")
    step()
    return step, forward


def measure_shape(shape_name, dims, batch, peers, rounds, min_seconds, notes):
    """The rows of one shape: each model's median step and forward over ours, with the step's per-round spread."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (batch, dims["block_size"]), generator=gen)
    y = torch.randint(0, VOCAB, (batch, dims["block_size"]), generator=gen)
    labels, baselines, fns = [], [], []
    dense = None
    for label, baseline, make in model_makers(peers, dims, batch):
        torch.manual_seed(0)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # nanoGPT prints its parameter count
                model = make() if make else bench.TextbookGPT(dense)
            fns.append(step_and_forward(model, x, y))
        except Exception as e:
            if baseline is None:
                raise
            notes.append(f"{label}: skipped at the {shape_name} shape, it failed: {type(e).__name__}: {e}")
            continue
        if dense is None:
            dense = model
        labels.append(label)
        baselines.append(baseline)
    print(f"peers: {shape_name}, {len(labels)} models, {rounds} rounds of the training step ...", file=sys.stderr)
    steps = bench.interleaved_times([f[0] for f in fns], rounds, min_seconds)
    print(f"peers: {shape_name}, {rounds} rounds of the forward ...", file=sys.stderr)
    forwards = bench.interleaved_times([f[1] for f in fns], rounds, min_seconds)
    ours = {"dense": 0, "MoD": 1}
    rows = []
    for label, baseline, s, f in zip(labels, baselines, steps, forwards):
        if baseline is None:
            continue
        s0, f0 = steps[ours[baseline]], forwards[ours[baseline]]
        per_round = [a / b for a, b in zip(s, s0)]
        rows.append(dict(shape=shape_name, model=label, over=f"our {baseline}",
                         train_ratio=statistics.median(s) / statistics.median(s0),
                         train_min=min(per_round), train_max=max(per_round),
                         forward_ratio=statistics.median(f) / statistics.median(f0),
                         train_ms=1000 * statistics.median(s), forward_ms=1000 * statistics.median(f),
                         ours_train_ms=1000 * statistics.median(s0), ours_forward_ms=1000 * statistics.median(f0)))
    return rows


# -----------------------------------------------------------------------------
# The table, the files, the command line


def shape_of(name, overrides):
    """(dims, batch) of bench.SHAPES[name] with overrides (n_layer, n_head, n_embd, block_size, batch_size)."""
    shape = {**bench.SHAPES[name], **(overrides or {})}
    batch = shape.get("batch_size", shape["batch_cpu"])
    return {k: shape[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}, batch


def table(rows, shape_names):
    cells = {}
    for r in rows:
        cells.setdefault(r["model"], {})[r["shape"]] = (f"{r['train_ratio']:.2f} [{r['train_min']:.2f}-"
                                                        f"{r['train_max']:.2f}] / {r['forward_ratio']:.2f}")
    lines = ["| model | " + " | ".join(f"{s} shape: train step / forward" for s in shape_names) + " |",
             "| --- |" + " --- |" * len(shape_names)]
    for model, by_shape in cells.items():
        lines.append(f"| {model} | " + " | ".join(by_shape.get(s, "-") for s in shape_names) + " |")
    return lines


def command(paths, shapes, rounds, out_dir):
    flags = [f"--{k}={paths[k]}" for k in PEERS if paths.get(k)]
    return " ".join(["python experiments/peers.py", *flags, f"--shapes={shapes}", f"--rounds={rounds}",
                     f"--out_dir={out_dir}"])


def report(rows, shape_names, dims_of, commits, notes, cmd, machine):
    lines = ["## Against nanoGPT and other MoD code", "", f"`{cmd}`", "",
             f"{machine}. Their median time over ours (below 1 is faster than us), the training step "
             "with the spread [min-max] of the per-round ratios, then the forward:", ""]
    lines += table(rows, shape_names) + [""]
    for name in shape_names:
        dims, batch = dims_of[name]
        ours = {r["over"]: r for r in rows if r["shape"] == name}
        times = "; ".join(f"{k}: train step {r['ours_train_ms']:.1f} ms, forward {r['ours_forward_ms']:.1f} ms"
                          for k, r in sorted(ours.items()))
        lines.append(f"- {name}: {dims['n_layer']} x {dims['n_embd']}, {dims['n_head']} heads, block "
                     f"{dims['block_size']}, batch {batch}. {times}")
    lines += ["", "Commits:", ""] + [f"- {k}: {v}" for k, v in commits.items()]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def check(paths, shapes, rounds):
    """The shape names, or a ValueError that says what is wrong."""
    shape_names = [s for s in shapes.split(",") if s]
    if not shape_names or set(shape_names) - bench.SHAPES.keys():
        raise ValueError(f"--shapes={shapes}: choose from {', '.join(bench.SHAPES)}")
    if set(paths) - PEERS.keys():
        raise ValueError(f"unknown peer(s) {sorted(set(paths) - PEERS.keys())}: choose from {', '.join(PEERS)}")
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    return shape_names


def run(paths, shapes="cpu,shakespeare_char", rounds=6, out_dir="bench_runs/peers", shape_overrides=None,
        min_seconds=0.3, threads=THREADS):
    """Measure every model at each shape of `shapes` (bench.SHAPES names, comma-separated); paths: {peer key:
    checkout} (keys of PEERS; a peer not given is skipped). Writes out_dir/peers.md and peers.json, prints the table,
    and returns the rows (dicts: shape, model, over, train_ratio, train_min, train_max, forward_ratio, times in ms).
    shape_overrides: dims for a quick run (n_layer, n_head, n_embd, block_size, batch_size); min_seconds: the
    shortest turn of a round (bench.interleaved_times); threads: torch's (restored afterwards; 1 for a quick run on a
    busy machine, where 2 threads on tiny shapes mostly wait for each other)."""
    shape_names = check(paths, shapes, rounds)
    notes = []
    peers = load_peers(paths, notes)
    for note in notes:
        print(note, file=sys.stderr)
    commits = {"this repository": commit_of(ROOT)}
    commits.update({PEERS[k].name: commit_of(paths[k]) for k in peers})
    dims_of = {name: shape_of(name, shape_overrides) for name in shape_names}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    machine = bench.machine("cpu")  # with its torch threads
    rows = []
    try:
        with torch.random.fork_rng(devices=[]):
            for name in shape_names:
                rows += measure_shape(name, *dims_of[name], peers, rounds, min_seconds, notes)
    finally:
        torch.set_num_threads(before)
    cmd = command(paths, shapes, rounds, out_dir)
    text = report(rows, shape_names, dims_of, commits, notes, cmd, machine)
    print(text)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "peers.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out_dir, "peers.json"), "w") as f:
        json.dump(dict(command=cmd, commits=commits, notes=notes, rounds=rounds, threads=threads,
                       shapes={n: dict(d, batch_size=b) for n, (d, b) in dims_of.items()}, rows=rows), f, indent=1)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    for key, peer in PEERS.items():
        parser.add_argument(f"--{key}", default="", metavar="PATH", help=f"a checkout of {peer.url}")
    parser.add_argument("--shapes", default="cpu,shakespeare_char", help=f"comma-separated: {', '.join(bench.SHAPES)}")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (medians and spread over them)")
    parser.add_argument("--out_dir", default="bench_runs/peers")
    args = vars(parser.parse_args(argv))
    paths = {k: args.pop(k) for k in PEERS}
    try:
        check(paths, args["shapes"], args["rounds"])
    except ValueError as e:
        parser.error(str(e))
    run(paths, **args)


if __name__ == "__main__":
    main()
