"""
Routing analysis (the paper's Fig. 5) on a trained MoD model: how many routed blocks each token goes through (against
what independent choices would give), the router weights of routed and skipped tokens, and routing against the
model's predictive entropy, with the tokens each block routes most.

    python experiments/routing_analysis.py                          # trains the CPU default MoD first (~1 minute)
    python experiments/routing_analysis.py --checkpoint_dir=out     # or: analyse the model train.py saved in out/

It measures on validation windows, under top-k routing (training's) and under causal predictor routing (sampling's).
The predictive entropy of a position is the entropy (nats) of the model's distribution over the next token there.
Writes bench_runs/routing_analysis/: routing_analysis.md, .json and .png.
"""

import math
import os

import torch
import torch.nn.functional as F

import common
import sample
import train


@torch.no_grad()
def analyse(model, windows, routing, batch=64):
    """Per token of windows (N, T + 1): which routed blocks processed it (N, T, R) bool, each block's router
    weight (N, T, R), and the predictive entropy and loss at its position (N, T)."""
    model.eval()
    used, weights, entropy, loss = [], [], [], []
    for w in windows.split(batch):
        logits, _ = model(w[:, :-1], routing=routing)  # (b, T, vocab)
        used.append(torch.stack([info.processed for info in model.last_infos], -1))
        weights.append(torch.stack([info.router_logits for info in model.last_infos], -1))
        logp = F.log_softmax(logits.float(), -1)
        entropy.append(-(logp.exp() * logp).sum(-1))
        loss.append(F.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none"))
    return torch.cat(used), torch.cat(weights), torch.cat(entropy), torch.cat(loss)


def run(checkpoint_dir="", out_dir="bench_runs/routing_analysis", windows=3200, data_dir="", plot=True, **settings):
    """Analyse the model in checkpoint_dir, or (without one) train the CPU default MoD into out_dir/model first;
    settings: train.main's settings for that training (tests make it tiny)."""
    data_dir = common.data_folder(data_dir)
    if not checkpoint_dir:
        checkpoint_dir = os.path.join(out_dir, "model")
        train.main(**dict(dict(device="cpu", data_dir=data_dir, sample_tokens=0, overwrite=True,
                               out_dir=checkpoint_dir), **settings))
    model, tokenizer = sample.load_model(checkpoint_dir, "cpu", checkpoint="latest")
    cfg = model.config
    T = cfg.block_size
    windows = common.bench.val_windows(data_dir, T, windows)
    blocks = cfg.routed_blocks()
    R = len(blocks)
    lines = [f"### Routing analysis: {cfg.n_layer} x {cfg.n_embd}, block {T}, capacity {cfg.capacity:.1%}, routed "
             f"blocks {blocks}; {len(windows):,} validation windows ({windows[:, :-1].numel():,} tokens); "
             f"model {checkpoint_dir}", ""]
    data = dict(checkpoint=checkpoint_dir, blocks=blocks, capacity=cfg.capacity)
    results = {routing: analyse(model, windows, routing) for routing in ("topk", "predictor")}

    # 1. how many routed blocks each token goes through, against independent choices at the measured rates
    lines += ["| routed blocks a token goes through | " + " | ".join(str(n) for n in range(R + 1)) + " |",
              "| --- |" + " --- |" * (R + 1)]
    data["blocks_used"] = {}
    for routing, (used, _, _, _) in results.items():
        counts = torch.bincount(used.sum(-1).flatten(), minlength=R + 1).double()
        share = (counts / counts.sum()).tolist()
        rates = used.double().mean((0, 1))  # (R,) each block's share of tokens
        independent = [0.0] * (R + 1)  # the distribution if each block chose independently at its rate
        for choice in range(2 ** R):
            bits = [(choice >> j) & 1 for j in range(R)]
            independent[sum(bits)] += math.prod(r if b else 1 - r for r, b in zip(rates.tolist(), bits))
        data["blocks_used"][routing] = dict(observed=share, independent=independent)
        name = "top-k" if routing == "topk" else "causal"
        lines.append(f"| {name}: share of tokens (%) | " + " | ".join(f"{100 * s:.1f}" for s in share) + " |")
        lines.append(f"| {name}: if blocks chose independently (%) | "
                     + " | ".join(f"{100 * s:.1f}" for s in independent) + " |")

    # 2. router weights, and 3. routing against the predictive entropy (top-k routing: training's)
    used, weights, entropy, loss = results["topk"]
    lines += ["", "| routed block | router weight of routed tokens: mean, share < 0 | of skipped tokens: mean | "
              "entropy where routed / skipped (nats) | loss where routed / skipped | correlation of router weight "
              "with entropy |", "| --- | --- | --- | --- | --- | --- |"]
    data["blocks"] = []
    for j, block in enumerate(blocks):
        u, r = used[..., j], weights[..., j]
        corr = torch.corrcoef(torch.stack([r.flatten(), entropy.flatten()]))[0, 1].item()
        row = dict(block=block, weight_routed=r[u].mean().item(), negative_routed=(r[u] < 0).float().mean().item(),
                   weight_skipped=r[~u].mean().item(), entropy_routed=entropy[u].mean().item(),
                   entropy_skipped=entropy[~u].mean().item(), loss_routed=loss[u].mean().item(),
                   loss_skipped=loss[~u].mean().item(), correlation=corr)
        data["blocks"].append(row)
        lines.append(f"| {block} | {row['weight_routed']:+.3f}, {100 * row['negative_routed']:.1f}% | "
                     f"{row['weight_skipped']:+.3f} | {row['entropy_routed']:.3f} / {row['entropy_skipped']:.3f} | "
                     f"{row['loss_routed']:.3f} / {row['loss_skipped']:.3f} | {corr:+.3f} |")
    n_used = used.sum(-1)
    data["entropy_by_blocks_used"] = [entropy[n_used == n].mean().item() if (n_used == n).any() else None
                                      for n in range(R + 1)]
    lines += ["", "| routed blocks a token goes through (top-k) | " + " | ".join(str(n) for n in range(R + 1)) + " |",
              "| --- |" + " --- |" * (R + 1),
              "| mean predictive entropy at its position (nats) | " + " | ".join(
                  "-" if e is None else f"{e:.3f}" for e in data["entropy_by_blocks_used"]) + " |"]

    # the tokens each block routes most (top-k), and how often
    table = common.bench.routed_token_rates(model, tokenizer, windows[:512, :-1])
    data["most_routed"] = table[:10]
    lines += ["", "The tokens top-k routes most (at least 20 occurrences in the first 512 windows), share routed "
              "per block: " + ", ".join(f"`{row['text']}` " + "/".join(f"{100 * v:.0f}%" for v in row["rates"])
                                       for row in table[:10]) + "."]
    lines += ["", "The entropy of a position is that of the model's prediction of the next token (a routed block's "
              "work at position t feeds the prediction at t and every later one); one trained model, one seed."]
    common.write(out_dir, "routing_analysis", lines, data)
    if plot:
        draw(data, results, os.path.join(out_dir, "routing_analysis.png"), cfg)
    return data


def draw(data, results, path, cfg):
    plt = common.pyplot()
    if plt is None:
        return
    R = len(data["blocks"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    ax = axes[0]
    x = torch.arange(R + 1)
    for i, (routing, name) in enumerate((("topk", "top-k"), ("predictor", "causal"))):
        shares = [100 * s for s in data["blocks_used"][routing]["observed"]]
        bars = ax.bar(x + (i - 0.5) * 0.4, shares, 0.4, label=name)
        ax.bar_label(bars, [f"{s:.1f}" for s in shares], fontsize=7)
    ax.plot(x, [100 * s for s in data["blocks_used"]["topk"]["independent"]], "k_", markersize=20,
            label="if blocks chose independently")
    ax.set_xticks(x.tolist())
    ax.set_xlabel("routed blocks a token goes through")
    ax.set_ylabel("share of tokens (%)")
    ax.legend(fontsize=8)
    used, weights, entropy, _ = results["topk"]
    blocks = [b["block"] for b in data["blocks"]]
    routed_and_skipped(axes[1], [weights[..., j] for j in range(R)], used, blocks, "router weight r (raw, Eq. 1)")
    routed_and_skipped(axes[2], [entropy] * R, used, blocks, "predictive entropy at the token's position (nats)")
    fig.suptitle(f"Routing analysis: {cfg.n_layer} x {cfg.n_embd}, block {cfg.block_size}, capacity "
                 f"{cfg.capacity:.1%} (python experiments/routing_analysis.py)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def routed_and_skipped(ax, values, used, blocks, xlabel):
    """One panel: for each routed block j, the distribution of values[j] (N, T) over the tokens it routes (solid)
    and over those it skips (dotted); used (N, T, R)."""
    bins = torch.linspace(min(v.min().item() for v in values), max(v.max().item() for v in values), 50).tolist()
    for j, (v, block) in enumerate(zip(values, blocks)):
        u = used[..., j]
        ax.hist(v[~u].tolist(), bins=bins, histtype="step", color=f"C{j}", linestyle=":", density=True)
        ax.hist(v[u].tolist(), bins=bins, histtype="step", color=f"C{j}", density=True,
                label=f"block {block}: routed (solid), skipped (dotted)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=8)


if __name__ == "__main__":
    run(**common.command_line(__doc__, checkpoint_dir="", out_dir="bench_runs/routing_analysis", windows=3200,
                              data_dir=""))
