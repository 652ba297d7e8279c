"""
Sample from a trained Mixture-of-Depths model and watch causal routing at work.

    python sample.py                                  # 3 samples from out/best.pt, as one batch
    python sample.py --start="ROMEO:" --show_routing  # which tokens each routed block spent compute on
    python sample.py --start=FILE:prompt.txt --num_samples=8 --routing=router

While sampling, top-k over the sequence is impossible (it would need the future). Each routed block's predictor
decides instead, token by token: a token goes through the block when the predictor's logit is > 0, and a token that
skips the block costs nothing there and stores no keys/values. The report after the samples says how fast that was,
how much smaller the KV cache is than a dense model's, and how often the predictor agreed with what top-k would have
chosen on the finished text.

It loads out_dir/best.pt, the model with the lowest validation loss (train.py writes it at an evaluation that
improves on all earlier ones), or with --checkpoint=latest out_dir/ckpt.pt, the state where training stopped. Before
training's first evaluation there is no best.pt yet, and ckpt.pt is used (with a note).

From Python: import sample; report = sample.main(start="ROMEO:", show_routing=True)
"""

import os
import sys
import time

import torch

from data.prepare import Tokenizer
from mod import MoDConfig, MoDGPT, confusion, predictor_scores
from plumbing import (ArgumentParser, CheckpointError, Checkpoints, ConfigError, allow_tf32, autocast_for,
                      first_reason, load_checkpoint, pick_device, pick_dtype, require, run_cli)


MAX_NEW_TOKENS = 1_000_000  # checked where it enters: each new token copies the sequence so far, so far longer
#                             samples would take hours and finally more memory than there is


def load_model(out_dir, device, checkpoint="best"):
    """The model and tokenizer that train.py saved in out_dir: best.pt (the lowest validation loss; ckpt.pt while
    there is none yet) or, with checkpoint="latest", ckpt.pt (where training stopped)."""
    path = Checkpoints.to_sample(out_dir, checkpoint)
    ckpt = load_checkpoint(path, need=("model", "model_config", "meta"))  # NaN weights are refused here too
    try:
        model = MoDGPT(MoDConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:  # a config of another version, or weights of another shape
        raise CheckpointError(f"{path} holds a model this mod.py cannot build ({first_reason(e)}): "
                              f"train it again with this version") from None
    return model.to(device).eval(), Tokenizer(ckpt["meta"])


def encode_prompt(start, tokenizer, block_size):
    """The prompt's token ids, and a note for each thing we changed about it."""
    notes = []
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        try:
            with open(path, encoding="utf-8") as f:
                start = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the prompt file {path!r} ({e}): give a readable UTF-8 text file") from None
    ids = tokenizer.encode(start)  # ValueError naming any character the vocabulary lacks
    if not ids:
        ids = [tokenizer.newline_or_eot]
        notes.append("empty prompt: starting from " + ("a newline" if tokenizer.enc is None else "<|endoftext|>"))
    if len(ids) > block_size:
        notes.append(f"the prompt has {len(ids)} tokens, more than the model's context of {block_size}: "
                     f"it sees only the last {block_size}")
        ids = ids[-block_size:]  # generate() would crop it the same way; we say so
    return ids, notes


# -----------------------------------------------------------------------------
# what the routing looked like


def mark(value, n_experts):
    """The mark under a token: '^' if a MoD block processed it. In a MoDE block (mode.py; value: bit e for expert e,
    bit n_experts for "went through a staged block") the expert that took it, '+' for several, '.' for the block
    without an expert, ' ' for none (it skipped the block, or its weight went to the no-op and no expert took it)."""
    if isinstance(value, bool):
        return "^" if value else " "
    experts = [e for e in range(n_experts) if value >> e & 1]
    return str(experts[0]) if len(experts) == 1 else "+" if experts else "." if value else " "


def render_routing(pieces, rows, names, color, n_experts=0):
    """Text with the routing under it. pieces: each token's text; rows: per routed block, a list of bools per token
    (ints for MoDE blocks, see mark). Plain: under each line of text, one row per routed block with '^' under the
    tokens it processed (a MoDE block: the expert).
    Colour: each token shaded by how many routed blocks it went through (darker = more compute)."""
    if color:
        shades = ["", "\033[48;5;153m", "\033[48;5;111m", "\033[48;5;69m", "\033[48;5;27m"]
        out = []
        for t, piece in enumerate(pieces):
            depth = min(sum(bool(row[t]) for row in rows), len(shades) - 1)
            text = piece.replace("\n", "\u21b5\n") if depth else piece  # show a routed newline
            out.append(f"{shades[depth]}{text}\033[0m" if depth else text)
        legend = "  ".join(f"{shades[d]} {d} \033[0m" for d in range(1, min(len(rows), len(shades) - 1) + 1))
        return "".join(out) + f"\n[routed blocks a token went through: {legend}]"

    width = max(len(f"block {n}") for n in names) + 2
    lines, text, marks = [], "", [""] * len(rows)

    def flush():
        lines.append(" " * width + text)
        lines.extend((f"block {n}".ljust(width) + m).rstrip() for n, m in zip(names, marks))

    for t, piece in enumerate(pieces):
        for ch in piece:
            for b, row in enumerate(rows):
                marks[b] += mark(row[t], n_experts)
            if ch == "\n":  # the newline's mark sits one past the end of its line
                flush()
                text, marks = "", [""] * len(rows)
            else:
                text += ch
    if text or any(m.strip() for m in marks):
        flush()
    return "\n".join(lines)


@torch.no_grad()
def topk_agreement(model, idx, routing):
    """How often the causal decisions agree with top-k on the finished text, per routed block.

    Runs the model once more over the last block_size tokens with the causal rule, and compares each routed block's
    decisions with the top-k that its router would have picked from the same inputs (the predictor's target)."""
    model(idx[:, -model.config.block_size:], routing=routing)
    stats = []
    for info in model.last_infos:  # one RoutingInfo per routed block
        scores = predictor_scores(confusion(info.processed, info.topk))  # accuracy alone flatters: see there
        stats.append(dict(agreement=scores["accuracy"], balanced=scores["balanced"], precision=scores["precision"],
                          recall=scores["recall"], routed=info.processed.float().mean().item()))
    return stats


def scores_text(stats):
    return (f"agreement {stats['agreement']:.1%} (balanced {stats['balanced']:.1%}), precision "
            f"{stats['precision']:.1%}, recall {stats['recall']:.1%}")


# -----------------------------------------------------------------------------


def main(out_dir="out", start="\n", num_samples=3, max_new_tokens=500, temperature=0.8, top_k=200, seed=1337,
         device="", routing="predictor", show_routing=False, color="auto", checkpoint="best"):
    """Generate num_samples samples as one batch; print them, the routing if asked, and a report. Returns the report
    as a dict (samples, tokens_per_s, kv_bytes, dense_kv_bytes, per-block routing and agreement)."""
    require(routing in ("predictor", "router"),
            f"--routing must be predictor or router (top-k would need the future), got {routing!r}")
    require(num_samples >= 1 and max_new_tokens >= 1, "--num_samples and --max_new_tokens must be >= 1")
    require(max_new_tokens <= MAX_NEW_TOKENS, f"--max_new_tokens must be at most {MAX_NEW_TOKENS:,}, got "
                                              f"{max_new_tokens:,}: sample in several runs")
    require(0 <= seed < 2**63, f"--seed must be in [0, 2**63), got {seed}")
    require(color in ("auto", "always", "never"), f"--color must be auto, always or never, got {color!r}")
    device = pick_device(device)
    # generate in the dtype training picks on this device: on a GPU bf16 (or fp16) autocast, with TF32 for what
    # stays in fp32 (the routing does); on a CPU float32
    autocast = autocast_for(pick_dtype("auto", device), device.split(":")[0])
    if device.startswith("cuda"):
        allow_tf32()
    torch.manual_seed(seed)
    model, tokenizer = load_model(out_dir, device, checkpoint)
    cfg = model.config
    ids, notes = encode_prompt(start, tokenizer, cfg.block_size)
    for note in notes:
        print(f"note: {note}")
    if routing == "router" and cfg.router_aux_loss == 0 and cfg.routed_blocks():
        print("note: this model was trained with router_aux_loss=0, so its router was not taught to be causal; "
              "--routing=predictor is the reliable choice")
        model.warned_router = True  # the note says it: the model's own warning (for API users) would repeat it

    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)  # (num_samples, T): one batch
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.time()
    # token by token, each routed block's predictor decides whether the token goes through it (mod.py: generate,
    # then MoDBlock.causal_route, the one rule: logit > 0)
    with autocast:
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, routing=routing)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.time() - t0
    routing_seen = model.last_routing  # per block: None or (B, T) bool over the whole returned sequence
    cache_nbytes = model.last_cache_nbytes
    blocks = cfg.routed_blocks()

    use_color = color == "always" or (color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    samples = []
    for b in range(num_samples):
        tokens = out[b].tolist()
        samples.append(tokenizer.decode(tokens))
        if show_routing and blocks:
            pieces = [tokenizer.decode([t]) for t in tokens]
            rows = [routing_seen[n][b].tolist() for n in blocks]
            print(render_routing(pieces, rows, blocks, use_color, cfg.n_experts))
        else:
            print(samples[-1])
        print("---------------")
    if show_routing and not blocks:
        print("(a dense model: every block processes every token, there is no routing to show)")

    report = dict(samples=samples, seconds=seconds, tokens_per_s=num_samples * max_new_tokens / seconds,
                  kv_bytes=sum(cache_nbytes), dense_kv_bytes=cache_nbytes[0] * cfg.n_layer, blocks=[])
    # block 0 is always dense, so its cache is what every block of a dense model of the same shape would hold
    print(f"{num_samples} x {max_new_tokens} tokens in {seconds:.2f} s: {report['tokens_per_s']:.1f} tokens/s "
          f"({device}, batch {num_samples}, KV cache, {f'{routing} routing' if blocks else 'dense model'})")
    print(f"KV cache at the end: {report['kv_bytes'] / 1024:.1f} KiB, a dense model of the same shape holds "
          f"{report['dense_kv_bytes'] / 1024:.1f} KiB ({report['kv_bytes'] / report['dense_kv_bytes']:.2f}x)")
    if blocks:
        generated = torch.zeros_like(out, dtype=torch.bool)
        generated[:, len(ids):-1] = True  # generated tokens that went through the model (not the last one)
        with autocast:
            agreement = topk_agreement(model, out, routing)
        print(f"routing per block (trained capacity {cfg.capacity:.1%}); agreement with top-k on the last "
              f"{min(out.size(1), cfg.block_size)} tokens:")
        if cfg.n_experts:  # MoDE (mode.py): one routing decision per expert (and MoD's in a staged block)
            decisions = (["MoD"] if cfg.mode == "staged" else []) + [f"expert {e}" for e in range(cfg.n_experts)]
            for i, stats in enumerate(agreement):
                name = f"block {blocks[i // len(decisions)]} {decisions[i % len(decisions)]}"
                print(f"  {name}: causal routing took {stats['routed']:.1%} of the last window's tokens there; "
                      + scores_text(stats))
            agreement = agreement[::len(decisions)]  # below: each block's share of tokens, and its first decision
        for n, stats in zip(blocks, agreement):
            routed = (routing_seen[n][generated] != 0).float().mean().item() if generated.any() else 0.0
            report["blocks"].append(dict(block=n, routed_while_sampling=routed, **stats))
            print(f"  block {n}: routed {routed:.1%} of {int(generated.sum())} generated tokens" + (
                  "; " + scores_text(stats) if not cfg.n_experts else " (MoDE: through the block or to some expert)"))
    return report


def cli(argv):
    p = ArgumentParser(prog="sample.py", description="Sample from a trained MoD model (see the top of sample.py).")
    p.add_argument("--out_dir", default="out", help="folder holding the checkpoints (default: out)")
    p.add_argument("--checkpoint", default="best", choices=["best", "latest"],
                   help="best: best.pt, the lowest validation loss (ckpt.pt while there is none yet); latest: ckpt.pt, "
                        "where training stopped (default: best)")
    p.add_argument("--start", default="\n", help='the prompt, or FILE:path to read it from a file (default: "\\n")')
    p.add_argument("--num_samples", type=int, default=3, help="samples, generated as one batch (default: 3)")
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="", help="cpu, cuda, mps (default: the best available)")
    p.add_argument("--routing", default="predictor", choices=["predictor", "router"],
                   help="the causal rule: the predictor's logit > 0, or the router's (if trained with router_aux_loss)")
    p.add_argument("--show_routing", action="store_true", help="show which tokens each routed block processed")
    p.add_argument("--color", default="auto", choices=["auto", "always", "never"],
                   help="shade tokens in colour (auto: when printing to a terminal)")
    run_cli(lambda: main(**vars(p.parse_args(argv))))


if __name__ == "__main__":
    cli(sys.argv[1:])
