"""
The last-position anomaly (docs/results.md): MoD predicts the last position of its window worse than the middle,
by more than dense does. This script measures it and the evidence for its cause, the last row of the position
embedding (wpe[T-1]), for dense and MoD over several seeds:

    python experiments/anomaly.py      # the CPU default (block 64), dense and MoD, 3 seeds: ~8 minutes on 2 cores

- **excess**: on validation windows, the loss at position T-1 minus the mean over positions T/2..T-3, MoD's minus
  dense's (paired; bench.last_vs_middle).
- **gradient ratio**: the mean, over `grad_batches` training batches, of the L2 norm of the LM loss's gradient with
  respect to row T-1 of wpe, divided by the same mean over the middle rows T/2..T-3. It is measured on the weights
  at iterations 500, 1000, 1500 and 2000 (training runs in segments, each resuming the last: the same run as a
  straight one), with no weight change, on the same batches for both models. Row T-1 is trained only by the
  prediction at its own position; a middle row also by every later position that attends to it.
- **row distance**: ||wpe[T-1] - wpe[T-2]|| against ||wpe[T-2] - wpe[T-3]||, at the end.
- **copy fix**: the excess again with row T-2 copied into row T-1 at evaluation.
Writes bench_runs/anomaly/: anomaly.md and anomaly.json.
"""

import os

import numpy as np
import torch

import common
import sample
import train

MODELS = {"dense": dict(mod_every=0), "MoD": dict()}


def gradient_ratio(model, data_dir, T, batch_size, grad_batches):
    """Mean per-batch gradient norm of wpe's last row over that of its middle rows (see the top of the file)."""
    model.train()
    data = np.memmap(os.path.join(data_dir, "train.bin"), dtype=np.uint16, mode="r")
    generator = torch.Generator().manual_seed(0)  # the same batches for every model and checkpoint
    norms = []
    for _ in range(grad_batches):
        starts = torch.randint(len(data) - T - 1, (batch_size,), generator=generator).tolist()
        xy = torch.stack([torch.from_numpy(data[s:s + T + 1].astype(np.int64)) for s in starts])
        model.zero_grad(set_to_none=True)
        logits, _ = model(xy[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), xy[:, 1:].flatten()).backward()  # the LM loss
        norms.append(model.transformer.wpe.weight.grad.norm(dim=1))  # (T,)
    model.zero_grad(set_to_none=True)
    model.eval()
    mean = torch.stack(norms).mean(0)
    return (mean[T - 1] / mean[T // 2:T - 2].mean()).item()


def run(seeds=3, max_iters=2000, segments=4, grad_batches=50, eval_iters=200, out_dir="bench_runs/anomaly",
        data_dir="", **overrides):
    shape = dict(common.SETTINGS["block 64"], **overrides)
    batch_size = shape.pop("batch_size")
    T = shape["block_size"]
    data_dir = common.data_folder(data_dir)
    windows = common.bench.val_windows(data_dir, T, max(20, eval_iters * common.bench.EVAL_TOKENS // T))
    rows = {}
    for seed in range(1337, 1337 + seeds):
        for name, fields in MODELS.items():
            folder = os.path.join(out_dir, f"{name}_{seed}")
            settings = common.train_settings(shape, batch_size, max_iters, 20, data_dir=data_dir, seed=seed,
                                             sample_tokens=0, out_dir=folder, **fields)
            ratios = []
            for k in range(1, segments + 1):  # train to k/segments of the run, resuming the previous segment
                end = round(max_iters * k / segments)
                train.main(**dict(settings, max_iters=end, eval_interval=end, log_interval=end,
                                  init_from="resume" if k > 1 else "scratch", overwrite=k == 1))
                model, _ = sample.load_model(folder, "cpu", checkpoint="latest")
                ratios.append((end, gradient_ratio(model, data_dir, T, batch_size, grad_batches)))
            wpe = model.transformer.wpe.weight.detach()
            distances = (wpe[T - 1] - wpe[T - 2]).norm().item(), (wpe[T - 2] - wpe[T - 3]).norm().item()
            losses = common.bench.position_losses(model, windows)
            with torch.no_grad():
                wpe[T - 1] = wpe[T - 2]  # the copy fix, at evaluation only
            rows[name, seed] = dict(ratios=ratios, losses=losses, fixed=common.bench.position_losses(model, windows),
                                    distance_last=distances[0], distance_before=distances[1])
    lines, data = tables(rows, seeds, T, max_iters, grad_batches, len(windows))
    common.write(out_dir, "anomaly", lines, data)
    return data


def tables(rows, seeds, T, max_iters, grad_batches, n_windows):
    seed_list = list(range(1337, 1337 + seeds))
    last = common.bench.last_vs_middle
    lines = [f"### The last-position anomaly: block {T}, {max_iters} iterations, seeds {', '.join(map(str, seed_list))}"
             f"; {n_windows:,} validation windows", "",
             f"| model | seed | gradient ratio, row {T - 1} / rows {T // 2}-{T - 3}, at iterations "
             f"{', '.join(str(e) for e, _ in rows['dense', seed_list[0]]['ratios'])} | "
             f"last minus middle (position {T - 1} minus {T // 2}-{T - 3}) | the same with row {T - 2} copied into "
             f"row {T - 1} | ||wpe[{T - 1}] - wpe[{T - 2}]|| / ||wpe[{T - 2}] - wpe[{T - 3}]|| |",
             "| --- | --- | --- | --- | --- | --- |"]
    data = dict(seeds=seed_list, rows=[], excess={})
    for (name, seed), r in rows.items():
        d, se = common.bench.mean_se(last(r["losses"]))
        f, fse = common.bench.mean_se(last(r["fixed"]))
        lines.append(f"| {name} | {seed} | {' / '.join(f'{v:.2f}' for _, v in r['ratios'])} | {d:+.4f} ± {se:.4f} | "
                     f"{f:+.4f} ± {fse:.4f} | {r['distance_last']:.3f} / {r['distance_before']:.3f} |")
        data["rows"].append(dict(model=name, seed=seed, ratios=r["ratios"], last_minus_middle=d,
                                 fixed_last_minus_middle=f, distance_last=r["distance_last"],
                                 distance_before=r["distance_before"]))
    lines += ["", "| MoD's excess over dense (paired) | per seed | mean ± seed sd | verdict |",
              "| --- | --- | --- | --- |"]
    for key, label in (("losses", "as trained"), ("fixed", f"row {T - 2} copied into row {T - 1}, both models")):
        per_seed = [common.bench.mean_se(last(rows["MoD", s][key]) - last(rows["dense", s][key])) for s in seed_list]
        mean, sd, verdict = common.over_seeds([v for v, _ in per_seed])
        data["excess"][key] = dict(per_seed=per_seed, mean=mean, sd=sd, verdict=verdict)
        lines.append(f"| {label} | {' / '.join(f'{v:+.4f} ± {se:.4f}' for v, se in per_seed)} | "
                     f"{mean:+.4f} ± {sd:.4f} | {verdict} |")
    lines += ["", f"The gradient ratio is the mean over {grad_batches} training batches (the same for every model) of "
              f"the L2 norm of the LM loss's gradient on wpe's row {T - 1}, over the same mean for rows "
              f"{T // 2}-{T - 3}, measured on the saved weights at each iteration shown (no update)."]
    return lines, data


if __name__ == "__main__":
    run(**common.command_line(__doc__, seeds=3, max_iters=2000, segments=4, grad_batches=50, eval_iters=200,
                              out_dir="bench_runs/anomaly", data_dir=""))
