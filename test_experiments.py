"""
The experiments of experiments/ (issue: results that survive a second seed), each run at a tiny size: seeds,
isoFLOP, capacity x frequency, routing analysis, the last-position anomaly, the peer comparison. The full runs take
minutes to half an hour each; these check that each runs with its one command and that what it reports adds up.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "experiments"))

import common  # noqa: E402
from data.prepare import prepare  # noqa: E402

TINY = dict(n_layer=4, n_head=2, n_embd=16, block_size=16)  # blocks 1 and 3 routed
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    (root / "input.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 300)
    prepare("shakespeare_char", input_path=str(root / "input.txt"), out_dir=str(root / "data"))
    return str(root / "data")


def test_a_difference_holds_only_when_its_t_interval_across_seeds_excludes_zero():
    mean, sd, verdict = common.over_seeds([0.010, 0.012, 0.011])
    assert mean == pytest.approx(0.011) and sd == pytest.approx(0.001) and verdict == "holds"
    # the same sign on every seed is not enough: 3 seeds need the mean over 4.30 x sd / sqrt(3) from 0
    mean, sd, verdict = common.over_seeds([0.002, 0.006, 0.010])
    assert verdict == "within the noise" and mean > 2 * sd / math.sqrt(3)  # ... which 2 standard errors would pass
    assert common.over_seeds([0.01, -0.01, 0.02])[2] == "within the noise"
    assert common.over_seeds([0.5]) == (0.5, 0.0, "one seed")


def test_seeds_runs_every_row_over_each_seed_and_pairs_each_seed_with_its_own_dense(data, tmp_path):
    import seeds
    out = seeds.run(seeds=2, max_iters=3, eval_iters=1, out_dir=str(tmp_path), data_dir=data, deeper=True,
                    predictor_hidden=8, **TINY)
    assert out["seeds"] == [1337, 1338]
    assert list(out["rows"]) == [seeds.ROWS[name][0] for name in seeds.DEFAULT_ROWS.split(",")]
    flops = {label: row["flops"] for label, row in out["rows"].items()}
    assert flops["dense"] == 1.0 and flops["shallow control"] < flops["MoD"] < 1.0 < flops["nearest-FLOP MoD (deeper)"]
    assert flops["random control, weight 1"] == flops["MoD"]
    assert all(len(row["topk"]) == 2 for row in out["rows"].values())
    assert "causal" in out["rows"]["MoD"] and "causal" not in out["rows"]["dense"]
    # every comparison: one paired difference per seed, and its mean is the mean of the rows' per-seed losses
    mod_minus_dense = out["comparisons"]["MoD - dense"]
    assert len(mod_minus_dense["per_seed"]) == 2
    expected = [a - b for a, b in zip(out["rows"]["MoD"]["topk"], out["rows"]["dense"]["topk"])]
    assert [d for d, _ in mod_minus_dense["per_seed"]] == pytest.approx(expected, abs=1e-6)
    assert len(out["comparisons"]) == len(seeds.COMPARISONS) - 7  # all but those of the rows not asked for
    assert all(c["verdict"] in ("holds", "within the noise") for c in out["comparisons"].values())
    table = (tmp_path / "block64.md").read_text()
    assert "| random control, weight 1 |" in table and "mean ± seed sd" in table
    assert json.loads((tmp_path / "block64.json").read_text())["seeds"] == [1337, 1338]


def test_seeds_trains_only_the_rows_asked_for_and_dense(data, tmp_path):
    import seeds
    out = seeds.run(seeds=1, max_iters=3, eval_iters=1, out_dir=str(tmp_path), data_dir=data, rows="mod_4_3",
                    predictor_hidden=8, **TINY)
    assert list(out["rows"]) == ["dense", "MoD, 4/3 the iterations"]
    assert out["rows"]["MoD, 4/3 the iterations"]["iters"] == 4 and out["rows"]["dense"]["iters"] == 3
    assert list(out["comparisons"]) == ["MoD with 4/3 the iterations, causal - dense"]
    assert (tmp_path / "block64_dense_mod_4_3.md").exists()
    # the predictor clipped with the trunk, as train.py did before clip_groups: the same top-k path, other weights
    import train
    together = seeds.run(seeds=1, max_iters=10, eval_iters=1, out_dir=str(tmp_path), data_dir=data,
                         rows="mod,mod_clip_together", predictor_hidden=8, grad_clip=0.01, warmup_iters=0,
                         learning_rate=0.01, **TINY)
    assert train.clip_groups is not seeds.clipped_together  # restored
    assert together["rows"]["MoD"]["topk"] != together["rows"]["MoD, predictor clipped with the trunk"]["topk"]
    assert "clipped together - apart, causal" in together["comparisons"]
    with pytest.raises(SystemExit, match="no row moe; the rows are dense, shallow"):
        seeds.run(seeds=1, out_dir=str(tmp_path), data_dir=data, rows="mod,moe", **TINY)


def test_isoflop_gives_each_model_the_iterations_its_budget_buys(data, tmp_path):
    import isoflop
    out = isoflop.run(budgets="0.05", sizes="2x16,4x16", block_size=16, batch_size=2, eval_iters=1,
                      out_dir=str(tmp_path), data_dir=data, repeats=1, predictor_hidden=8, plot=HAS_MATPLOTLIB)
    runs = out["runs"]
    assert [(r["family"], r["shape"]["n_layer"]) for r in runs] == [("dense", 2), ("dense", 4), ("MoD", 2),
                                                                     ("MoD", 4)]
    budget = 0.05 * 3 * common.flops(dict(isoflop.REFERENCE, block_size=16), mod_every=0) * 2  # FLOPs
    for r in runs:  # each trained the budget's FLOPs, to within half an iteration
        assert abs(r["flops"] - budget) <= r["flops"] / r["iters"] / 2
    assert runs[3]["iters"] > runs[1]["iters"]  # MoD's step is cheaper: more steps on the same budget
    best = out["best"][0.05]
    assert len(best["step_ms"]) == 2 and all(ms > 0 for ms in best["step_ms"])
    assert {best["dense"], best["mod"]} <= {f"0.05_{r['family']}_{r['shape']['n_layer']}x16" for r in runs}
    assert (tmp_path / "isoflop.md").exists() and (tmp_path / "isoflop.png").exists() == HAS_MATPLOTLIB


def test_capacity_frequency_sweeps_capacity_and_routed_blocks(data, tmp_path):
    import capacity_frequency
    out = capacity_frequency.run(max_iters=2, eval_iters=1, out_dir=str(tmp_path), data_dir=data, predictor_hidden=8,
                                 plot=HAS_MATPLOTLIB, **TINY)
    models = out["models"]
    assert len(models) == 1 + 3 * 2
    every, other = models["12.5%, every block"], models["12.5%, every other block"]
    assert every["mod_every"] == 1 and other["mod_every"] == 2
    assert other["flops"] < models["50.0%, every other block"]["flops"] < 1.0  # more capacity, more FLOPs
    assert len(every["scores"]) == 3 and len(other["scores"]) == 2  # blocks 1, 2, 3 against 1 and 3
    assert (tmp_path / "capacity_frequency.png").exists() == HAS_MATPLOTLIB


def test_routing_analysis_counts_the_blocks_each_token_uses(data, tmp_path):
    import routing_analysis
    out = routing_analysis.run(windows=24, out_dir=str(tmp_path), data_dir=data, plot=HAS_MATPLOTLIB,
                               predictor_hidden=8, max_iters=4, lr_decay_iters=4, eval_interval=4, eval_iters=1,
                               batch_size=4, **TINY)
    assert out["blocks"] and [b["block"] for b in out["blocks"]] == [1, 3]
    topk = out["blocks_used"]["topk"]
    assert sum(topk["observed"]) == pytest.approx(1.0) and sum(topk["independent"]) == pytest.approx(1.0)
    # under top-k each block takes exactly k = 2 of 16 tokens: 2 x 1/8 routed blocks per token on average
    assert sum(n * share for n, share in enumerate(topk["observed"])) == pytest.approx(2 * 2 / 16)
    assert all(-1 <= b["correlation"] <= 1 for b in out["blocks"])
    assert (tmp_path / "routing_analysis.md").exists() and (tmp_path / "routing_analysis.png").exists() == \
        HAS_MATPLOTLIB


def test_anomaly_measures_the_gradient_ratio_in_resumed_segments(data, tmp_path):
    import anomaly
    out = anomaly.run(seeds=1, max_iters=4, segments=2, grad_batches=2, eval_iters=1, out_dir=str(tmp_path),
                      data_dir=data, predictor_hidden=8, n_layer=2, n_head=2, n_embd=16, block_size=16)
    assert [(r["model"], [it for it, _ in r["ratios"]]) for r in out["rows"]] == [("dense", [2, 4]), ("MoD", [2, 4])]
    assert all(ratio > 0 for r in out["rows"] for _, ratio in r["ratios"])
    assert out["excess"]["losses"]["verdict"] == "one seed"
    # the segments resumed one run: 4 iterations in all, as one straight run
    assert torch.load(tmp_path / "MoD_1337" / "ckpt.pt", weights_only=True)["iter_num"] == 4


def test_gradient_ratio_is_the_last_rows_gradient_norm_over_the_middle_rows(data):
    import anomaly
    from mod import MoDConfig, MoDGPT
    import numpy as np
    torch.manual_seed(0)
    model = MoDGPT(MoDConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=27, mod_every=0))
    # one batch, drawn as gradient_ratio draws it: the definition, computed by hand
    tokens = np.memmap(os.path.join(data, "train.bin"), dtype=np.uint16, mode="r")
    starts = torch.randint(len(tokens) - 17, (4,), generator=torch.Generator().manual_seed(0)).tolist()
    xy = torch.stack([torch.from_numpy(tokens[s:s + 17].astype(np.int64)) for s in starts])
    logits, _ = model(xy[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), xy[:, 1:].flatten()).backward()
    norms = model.transformer.wpe.weight.grad.norm(dim=1)
    expected = (norms[15] / norms[8:14].mean()).item()
    model.zero_grad(set_to_none=True)
    assert anomaly.gradient_ratio(model, data, 16, 4, 1) == pytest.approx(expected, rel=1e-5)
    assert model.transformer.wpe.weight.grad is None  # measured, not left behind for an optimizer


@pytest.mark.parametrize("script", ["seeds", "isoflop", "capacity_frequency", "routing_analysis", "anomaly",
                                    "peers"])
def test_each_experiment_has_one_command_with_help(script):
    out = subprocess.run([sys.executable, str(HERE / "experiments" / f"{script}.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--out_dir" in out.stdout and "usage:" in out.stdout


def test_peers_times_nanogpt_and_a_mod_peer_from_their_checkouts(tmp_path):
    import peers
    # MOD_PEERS_DIR: a folder holding the checkouts, named owner+repo (experiments/peers.py says how to get them)
    if not os.environ.get("MOD_PEERS_DIR"):
        pytest.skip("set MOD_PEERS_DIR to a folder of peer checkouts (karpathy+nanoGPT, Mixture-AI+Mixture-of-Depths)")
    root = Path(os.environ["MOD_PEERS_DIR"])
    paths = dict(nanogpt=str(root / "karpathy+nanoGPT"), mixture_ai=str(root / "Mixture-AI+Mixture-of-Depths"))
    missing = [p for p in paths.values() if not os.path.isdir(p)]
    if missing:
        pytest.skip(f"no peer checkout at {', '.join(missing)} (experiments/peers.py says how to get them)")
    rows = peers.run(paths, shapes="cpu", rounds=2, out_dir=str(tmp_path), shape_overrides=dict(TINY, batch_size=2),
                     min_seconds=0, threads=1)
    assert [(r["model"], r["over"]) for r in rows] == [("nanoGPT's GPT, over our dense", "our dense"),
                                                        ("the textbook GPT, over our dense", "our dense"),
                                                        ("Mixture-AI/Mixture-of-Depths", "our MoD")]
    for r in rows:
        assert r["train_min"] <= r["train_max"] and r["train_ratio"] > 0 and r["forward_ratio"] > 0
    saved = json.loads((tmp_path / "peers.json").read_text())
    assert saved["rows"] == rows and saved["shapes"]["cpu"] == dict(TINY, batch_size=2)
    assert set(saved["commits"]) == {"this repository", "nanoGPT", "Mixture-AI/Mixture-of-Depths"}
    md = (tmp_path / "peers.md").read_text()
    assert "| Mixture-AI/Mixture-of-Depths | " in md and "--nanogpt=" in md and "--mixture_ai=" in md


def test_peers_names_a_missing_checkout_in_one_line_and_runs_the_rest(tmp_path, capsys):
    import peers
    nowhere = str(tmp_path / "no-nanoGPT-here")
    rows = peers.run(dict(nanogpt=nowhere), shapes="cpu", rounds=1, out_dir=str(tmp_path),
                     shape_overrides=dict(TINY, batch_size=2), min_seconds=0, threads=1)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("nanoGPT:")]
    assert lines == [f"nanoGPT: skipped, no checkout at {nowhere} (git clone https://github.com/karpathy/nanoGPT "
                     f"{nowhere})"]
    assert [r["model"] for r in rows] == ["the textbook GPT, over our dense"]  # ours alone still measured
    assert "the textbook GPT, over our dense" in (tmp_path / "peers.md").read_text()
