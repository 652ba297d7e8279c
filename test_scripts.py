"""Tests of the scripts around the model: data preparation, training, sampling, the benchmark, the notebook, and
every fault and bad input through the real command lines. The model's own specification is test_mod.py."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data.prepare as dp
import plumbing
import train
from data.prepare import DATASETS, URL, DataError, Tokenizer, load_meta, prepare, read_text
from dataclasses import fields

from mod import MoDConfig
from test_mod import capture_routing, routed_blocks, tiny

REPO = Path(__file__).resolve().parent

# =============================================================================
# data/prepare.py: every test writes its own small text to tmp_path; no network


SMALL_TEXT = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.

First Citizen:
First, you know Caius Marcius is chief enemy to the people.

All:
We know't, we know't.
"""


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No $SHAKESPEARE_TXT, the download cache in an empty folder, and no network. Returns the cache folder."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.delenv("SHAKESPEARE_TXT", raising=False)
    monkeypatch.setattr(dp, "CACHE_PATH", str(cache / "tinyshakespeare.txt"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return cache


@pytest.fixture
def small_input(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(SMALL_TEXT, encoding="utf-8")
    return path


class FakeResponse:
    """Stands in for urlopen's response: sends `body`, then fails with `error` (if any), claiming `length` bytes."""

    def __init__(self, body, length, error=None):
        self.body, self.error, self.sent = body, error, False
        self.headers = {"Content-Length": str(length)}

    def read(self, n=-1):
        if not self.sent:
            self.sent = True
            return self.body
        if self.error:
            raise self.error
        return b""  # the server closed the connection

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_prepare_char_writes_uint16_bins_that_decode_back(offline, small_input, tmp_path):
    out = tmp_path / "out"
    meta = prepare("shakespeare_char", str(small_input), str(out))
    assert meta == load_meta(str(out))  # meta.json round trip
    assert meta["tokenizer"] == "char" and meta["chars"] == "".join(sorted(set(SMALL_TEXT)))
    assert meta["vocab_size"] == len(set(SMALL_TEXT))
    n_train = int(len(SMALL_TEXT) * 0.9)  # 90/10 split by characters, one token per character
    assert os.path.getsize(out / "train.bin") == 2 * n_train  # 2 bytes per token: uint16
    assert os.path.getsize(out / "val.bin") == 2 * (len(SMALL_TEXT) - n_train)
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    tok = Tokenizer(meta)
    assert tok.decode(train) == SMALL_TEXT[:n_train] and tok.decode(np.concatenate([train, val])) == SMALL_TEXT
    assert tok.vocab_size == meta["vocab_size"] and tok.decode([tok.newline_or_eot]) == "\n"
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]  # no temporary files left behind


def test_prepare_bpe_round_trip(offline, small_input, tmp_path):
    import tiktoken
    out = tmp_path / "out"
    meta = prepare("shakespeare", str(small_input), str(out))  # needs TIKTOKEN_CACHE_DIR offline
    assert meta == load_meta(str(out))
    assert meta["vocab_size"] == 50257 and meta["eot_token"] == 50256 and meta["encoding"] == "r50k_base"
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    n_train = int(len(SMALL_TEXT) * 0.9)
    enc = tiktoken.get_encoding("r50k_base")
    assert train.tolist() == enc.encode_ordinary(SMALL_TEXT[:n_train])
    tok = Tokenizer(meta)
    assert tok.decode(train) + tok.decode(val) == SMALL_TEXT
    assert tok.vocab_size == 50257 and tok.newline_or_eot == 50256
    assert tok.encode("hi<|endoftext|>") == enc.encode("hi") + [50256]  # the special token in a prompt
    assert prepare("shakespeare", str(small_input), str(out))  # overwriting existing files works


def test_offline_without_a_file_says_both_ways_out_and_writes_nothing(offline, capsys):
    with pytest.raises(DataError) as e:
        read_text()
    message = str(e.value)
    assert "--input PATH" in message and "SHAKESPEARE_TXT" in message and URL in message and "internet" in message
    assert "\n" not in message
    assert list(offline.iterdir()) == []  # no empty cache file
    with pytest.raises(SystemExit) as exit_:  # the command line: one line on stderr, exit code 1
        dp.main("shakespeare_char", [])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--input PATH" in err and "Traceback" not in err


@pytest.mark.parametrize("error", [ConnectionResetError(104, "Connection reset by peer"), None])
def test_download_cut_off_midway_leaves_no_truncated_file(offline, monkeypatch, error):
    # the server sends part of the file, then resets the connection (or just closes it early)
    partial = FakeResponse(SMALL_TEXT[:50].encode(), length=1115394, error=error)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: partial)
    with pytest.raises(DataError, match="--input PATH"):
        read_text()
    assert list(offline.iterdir()) == []


def test_download_is_cached(offline, monkeypatch):
    body = SMALL_TEXT.encode()
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: FakeResponse(body, len(body)))
    assert read_text() == SMALL_TEXT
    assert (offline / "tinyshakespeare.txt").read_bytes() == body and len(list(offline.iterdir())) == 1
    monkeypatch.setattr(urllib.request, "urlopen", None)  # a second read must not download again
    assert read_text() == SMALL_TEXT


def test_bad_input_files(offline, tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="nope.txt"):
        read_text(str(missing))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        read_text(str(empty))
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("Speak, speak.\nRomeo\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8 text"):
        read_text(str(binary))
    with pytest.raises(DataError) as e:
        prepare("shakespeare_word", str(tmp_path / "x"))
    assert all(name in str(e.value) for name in DATASETS)


def test_shakespeare_txt_env_var_is_honoured(offline, monkeypatch, small_input, tmp_path):
    monkeypatch.setenv("SHAKESPEARE_TXT", str(small_input))
    assert read_text() == SMALL_TEXT  # no download (urlopen fails in the offline fixture)
    other = tmp_path / "other.txt"
    other.write_text("Exeunt.\n", encoding="utf-8")
    assert read_text(str(other)) == "Exeunt.\n"  # --input beats SHAKESPEARE_TXT
    monkeypatch.setenv("SHAKESPEARE_TXT", str(tmp_path / "gone.txt"))
    with pytest.raises(DataError, match="SHAKESPEARE_TXT.*gone.txt"):
        read_text()


def test_tokenizer_names_unknown_characters():
    tok = Tokenizer({"dataset": "shakespeare_char", "tokenizer": "char", "vocab_size": 4, "chars": "\nabc"})
    assert tok.encode("cab\n") == [3, 1, 2, 0] and tok.decode([3, 1, 2, 0]) == "cab\n"
    assert tok.newline_or_eot == 0
    with pytest.raises(ValueError) as e:
        tok.encode("abz€")
    message = str(e.value)
    assert "'z'" in message and "'€'" in message and "'a'" not in message and "4 characters" in message


def test_load_meta_errors(tmp_path):
    folder = tmp_path / "shakespeare_char"
    folder.mkdir()
    with pytest.raises(DataError, match="run python data/shakespeare_char/prepare.py"):
        load_meta(str(folder))
    (folder / "meta.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON"):
        load_meta(str(folder))


def test_bpe_without_tiktoken_cache_says_what_to_do(monkeypatch):
    import tiktoken

    def offline_get_encoding(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")
    monkeypatch.setattr(tiktoken, "get_encoding", offline_get_encoding)
    with pytest.raises(DataError, match="TIKTOKEN_CACHE_DIR"):
        Tokenizer({"dataset": "shakespeare", "tokenizer": "tiktoken", "encoding": "r50k_base", "vocab_size": 50257})


def test_prepare_script_runs_from_another_folder(small_input, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SHAKESPEARE_TXT"}
    script = str(REPO / "data" / "shakespeare_char" / "prepare.py")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, script, "--input", str(small_input), "--out_dir", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert f"vocab size: {len(set(SMALL_TEXT))}" in run.stdout
    assert load_meta(str(out))["chars"] == "".join(sorted(set(SMALL_TEXT)))
    assert os.path.getsize(out / "train.bin") == 2 * int(len(SMALL_TEXT) * 0.9)
    # a bad --input: exit code 1 and one line on stderr naming the file, no traceback
    run = subprocess.run([sys.executable, script, "--input", str(tmp_path / "missing.txt"), "--out_dir", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "missing.txt" in run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


# =============================================================================
# train.py (tiny models, a few iterations, CPU)

VERSES = ["First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
          "All:\nSpeak, speak.\n\n",
          "First Citizen:\nYou are all resolved rather to die than to famish?\n\n",
          "MENENIUS:\nWhat work's, my countrymen, in hand? where go you\nWith bats and clubs?\n\n"]


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    """A small character dataset (about 20k characters of verse) prepared the way train.py expects."""
    root = tmp_path_factory.mktemp("char")
    text = "".join(VERSES[i % 4] if i % 7 else VERSES[(i * 3) % 4].upper() for i in range(200))
    (root / "input.txt").write_text(text)
    prepare("shakespeare_char", input_path=str(root / "input.txt"), out_dir=str(root / "data"))
    return str(root / "data")


def tiny_run(data_dir, out_dir, **overrides):
    """Settings for a training run of a few seconds on a CPU."""
    settings = dict(data_dir=data_dir, out_dir=str(out_dir), device="cpu", n_layer=2, n_head=2, n_embd=32,
                    block_size=32, batch_size=8, max_iters=6, lr_decay_iters=6, warmup_iters=0, eval_interval=3,
                    eval_iters=2, log_interval=1, learning_rate=3e-3, sample_tokens=0, predictor_hidden=16)
    settings.update(overrides)
    return settings


def test_compiled_training_gives_the_losses_of_eager_training(char_data, tmp_path):
    # python train.py --compile=True on a CPU (inductor: about half a minute to compile even this tiny model)
    settings = dict(n_layer=2, n_embd=16, max_iters=4, lr_decay_iters=4, eval_interval=4, eval_iters=1)
    eager = train.main(**tiny_run(char_data, tmp_path / "eager", **settings))
    compiled = train.main(**tiny_run(char_data, tmp_path / "compiled", compile=True, **settings))
    losses = [[r["loss"] for r in run["history"] if r["kind"] == "train"] for run in (eager, compiled)]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], abs=1e-4)
    assert compiled["eval"]["val_predictor"] == pytest.approx(eager["eval"]["val_predictor"], abs=1e-4)


def test_a_few_iterations_lower_the_loss_and_report_everything(char_data, tmp_path, capsys):
    result = train.main(**tiny_run(char_data, tmp_path, max_iters=40, lr_decay_iters=40, eval_interval=40,
                                   eval_iters=4, sample_tokens=20, learning_rate=1e-2))
    out = capsys.readouterr().out
    first = float(out.split("step 0: train loss ")[1].split(",")[0])
    assert result["eval"]["train_topk"] < first - 0.5
    assert {"val_topk", "val_predictor", "predictor_accuracy", "predictor_balanced", "predictor_precision",
            "predictor_recall"} <= result["eval"].keys()
    assert "iter 1: loss " in out and "tok/s" in out and "routed 12.5%" in out  # 4 of 32 tokens
    assert "(causal predictor)" in out and "predictor accuracy" in out and "(balanced " in out
    assert len(result["sample"]) > 0 and os.path.exists(result["ckpt_path"])


def test_the_predictor_never_changes_what_the_language_model_learns(char_data, tmp_path, monkeypatch):
    # Two runs resume from one checkpoint, one with its predictors scaled up 30x (large BCE gradients). With the
    # predictors' gradients clipped apart from the trunk's (train.clip_groups), every trunk weight ends the same;
    # clipped together, under one norm, the predictors' gradients shrink the trunk's step.
    settings = dict(grad_clip=0.05)  # small: clipping acts at every step
    train.main(**tiny_run(char_data, tmp_path / "start", max_iters=3, **settings))

    def resume(name, scale):
        shutil.copytree(tmp_path / "start", tmp_path / name)
        ckpt = torch.load(tmp_path / name / "ckpt.pt", weights_only=False)
        for key in ckpt["model"]:
            if ".predictor." in key:
                ckpt["model"][key] *= scale
        torch.save(ckpt, tmp_path / name / "ckpt.pt")
        result = train.main(**tiny_run(char_data, tmp_path / name, init_from="resume", **settings))
        weights = torch.load(result["ckpt_path"], weights_only=True)["model"]
        return {k: v for k, v in weights.items() if ".predictor." not in k}, weights

    (a, all_a), (b, all_b) = resume("a", 1.0), resume("b", 30.0)
    assert a.keys() == b.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(all_a[k], all_b[k]) for k in all_a if ".predictor." in k)  # the predictors differ
    monkeypatch.setattr(train, "clip_groups", lambda model: [list(model.parameters())])  # one norm over all
    (c, _), (d, _) = resume("c", 1.0), resume("d", 30.0)
    assert any(not torch.equal(c[k], d[k]) for k in c)


def test_dense_baseline_trains_through_the_same_code(char_data, tmp_path, capsys):
    result = train.main(**tiny_run(char_data, tmp_path, mod_every=0))
    assert "val_predictor" not in result["eval"]
    assert "dense baseline" in capsys.readouterr().out


def test_resume_continues_exactly(char_data, tmp_path):
    settings = dict(dropout=0.1)  # dropout: the random state must continue exactly too
    straight = train.main(**tiny_run(char_data, tmp_path / "a", **settings))
    train.main(**tiny_run(char_data, tmp_path / "b", max_iters=3, **settings))
    resumed = train.main(**tiny_run(char_data, tmp_path / "b", init_from="resume", **settings))
    assert resumed["iter_num"] == straight["iter_num"] == 6
    a = torch.load(straight["ckpt_path"], weights_only=True)
    b = torch.load(resumed["ckpt_path"], weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 6
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert resumed["eval"] == straight["eval"]


def test_checkpoint_is_written_atomically(char_data, tmp_path, monkeypatch):
    train.main(**tiny_run(char_data, tmp_path, max_iters=3))
    ckpt_path, best_path = tmp_path / "ckpt.pt", tmp_path / "best.pt"
    before, best_before = ckpt_path.read_bytes(), best_path.read_bytes()

    def crash(obj, path):  # the process dies in the middle of writing the checkpoint
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        train.main(**tiny_run(char_data, tmp_path, init_from="resume"))
    assert ckpt_path.read_bytes() == before  # the last good checkpoint survived
    assert best_path.read_bytes() == best_before  # and so did the best one
    # and no half-written file is left (metrics.jsonl is the run's log, also written by rename)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "ckpt.pt", "metrics.jsonl"]


def test_ctrl_c_saves_between_iterations_and_resume_is_exact(char_data, tmp_path, monkeypatch):
    settings = dict(dropout=0.1, gradient_accumulation_steps=2, max_iters=8, lr_decay_iters=8, eval_interval=4)
    usual_handler = signal.getsignal(signal.SIGINT)
    straight = train.main(**tiny_run(char_data, tmp_path / "a", **settings))
    real_for_iteration = train.Batches.for_iteration

    def ctrl_c_during_iteration_5(self, it):
        if it == 5:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, in the middle of an iteration
        return real_for_iteration(self, it)
    monkeypatch.setattr(train.Batches, "for_iteration", ctrl_c_during_iteration_5)
    stopped = train.main(**tiny_run(char_data, tmp_path / "b", **settings))
    assert stopped["interrupted"] and stopped["iter_num"] == 6  # iteration 5 was finished, then it stopped
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["iter_num"] == 6
    monkeypatch.undo()
    evaluated = train.main(**tiny_run(char_data, tmp_path / "b", init_from="resume", eval_only=True, **settings))
    assert evaluated["iter_num"] == 6 and "val_predictor" in evaluated["eval"]  # also off an eval boundary
    resumed = train.main(**tiny_run(char_data, tmp_path / "b", init_from="resume", **settings))
    a = torch.load(straight["ckpt_path"], weights_only=True)["model"]
    b = torch.load(resumed["ckpt_path"], weights_only=True)["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert signal.getsignal(signal.SIGINT) is usual_handler  # the usual Ctrl-C is back


def test_bad_checkpoints_get_a_clear_error(char_data, tmp_path):
    with pytest.raises(plumbing.ConfigError, match="no checkpoint at .*train one first"):
        train.main(**tiny_run(char_data, tmp_path, init_from="resume"))
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(plumbing.CheckpointError, match="not a readable checkpoint"):
        train.main(**tiny_run(char_data, tmp_path, init_from="resume"))
    train.main(**tiny_run(char_data, tmp_path / "c", max_iters=3))
    with pytest.raises(plumbing.ConfigError, match="trained with n_layer=2, not 3"):
        train.main(**tiny_run(char_data, tmp_path / "c", init_from="resume", n_layer=3))


def test_non_finite_loss_stops_without_saving_garbage(char_data, tmp_path):
    with pytest.raises(SystemExit, match="stopping: .*(non-finite|became)"):
        train.main(**tiny_run(char_data, tmp_path, learning_rate=1e6, min_lr=0.0, grad_clip=0.0, max_iters=30,
                              eval_interval=30))
    assert not (tmp_path / "ckpt.pt").exists()


def resolve_config(asked, device_type):
    """train.py's settings from a device's preset and what was asked."""
    preset = train.GPU_DEFAULTS if device_type == "cuda" else train.CPU_DEFAULTS
    return plumbing.resolve_config(asked, preset, train.TrainConfig, MoDConfig)


def test_config_overrides_are_typed_and_checked():
    types = {f.name: f.type for config in (MoDConfig, train.TrainConfig) for f in fields(config)}
    assert plumbing.convert("dropout", "0", types["dropout"]) == 0.0  # nanoGPT asserts on --dropout=0
    assert plumbing.convert("compile", "False", types["compile"]) is False
    assert plumbing.convert("max_iters", "200", types["max_iters"]) == 200
    assert train.parse_args(["--max_iters=200", "--dataset=shakespeare"]) == {"max_iters": "200",
                                                                              "dataset": "shakespeare"}
    cfg, model = resolve_config({"max_iters": "7", "capacity": "0.25"}, "cpu")
    assert cfg.max_iters == 7 and model["capacity"] == 0.25 and model["n_layer"] == 4  # the CPU preset
    cfg, model = resolve_config({}, "cuda")
    assert model["n_layer"] == 6 and cfg.batch_size == 64  # nanoGPT's shakespeare_char on a GPU
    with pytest.raises(plumbing.ConfigError, match=r"unknown setting --max_iter \(did you mean --max_iters\?\)"):
        resolve_config({"max_iter": "3"}, "cpu")
    with pytest.raises(plumbing.ConfigError, match="--max_iters expects int, got 'ten'"):
        resolve_config({"max_iters": "ten"}, "cpu")
    with pytest.raises(plumbing.ConfigError, match="--compile expects bool"):
        resolve_config({"compile": "maybe"}, "cpu")
    with pytest.raises(plumbing.ConfigError, match="write settings as --key=value"):
        train.parse_args(["max_iters=3"])
    with pytest.raises(plumbing.ConfigError, match="--device=gpu is not a device: use cpu, cuda"):
        train.pick_device("gpu")
    with pytest.raises(ValueError, match="capacity must be in"):
        train.main(device="cpu", capacity=0.0, data_dir="no/such/dir")


def test_compile_is_on_by_default_on_a_gpu_only():
    assert resolve_config({}, "cuda")[0].compile is True  # one graph per step: the host no longer limits the GPU
    assert resolve_config({}, "cpu")[0].compile is False  # compiling costs a CPU run more than it saves
    assert resolve_config({"compile": "False"}, "cuda")[0].compile is False


def test_device_setup(monkeypatch):
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.delenv("RANK", raising=False)
    assert train.setup_device("") == ("cuda", False, 0, 1) and current == []  # the current GPU, whichever it is
    assert train.setup_device("cuda:1") == ("cuda:1", False, 0, 1) and current == ["cuda:1"]
    assert train.setup_device("cpu") == ("cpu", False, 0, 1)


def test_config_objects_are_taken_whole(char_data, tmp_path):
    run = tiny_run(char_data, tmp_path, max_iters=2)
    train_fields = {k: v for k, v in run.items() if k in train.TrainConfig.__dataclass_fields__}
    model_fields = {k: v for k, v in run.items() if k in MoDConfig.__dataclass_fields__}
    result = train.main(train.TrainConfig(**train_fields), MoDConfig(**model_fields, capacity=0.5), seed=7)
    ckpt = torch.load(result["ckpt_path"], weights_only=True)
    assert ckpt["model_config"]["capacity"] == 0.5 and ckpt["model_config"]["n_embd"] == 32
    assert ckpt["model_config"]["dropout"] == 0.0 and ckpt["train_config"]["batch_size"] == 8
    assert ckpt["train_config"]["seed"] == 7  # keywords win


def test_cli_prints_one_line_errors():
    run = subprocess.run([sys.executable, "train.py", "--n_layers=3"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode != 0
    assert run.stderr.strip() == ("error: unknown setting --n_layers (did you mean --n_layer?); the settings are "
                                  "the fields of TrainConfig in train.py and MoDConfig in mod.py")


def test_ddp_two_cpu_processes(char_data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    cmd += [f"--{k}={v}" for k, v in tiny_run(char_data, tmp_path, max_iters=3, gradient_accumulation_steps=2,
                                               eval_interval=3).items()]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "step 3: train loss" in run.stdout and (tmp_path / "ckpt.pt").exists()



def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]  # every line parses as JSON


def test_metrics_are_written_as_json_lines_and_returned_as_the_history(char_data, tmp_path):
    result = train.main(**tiny_run(char_data, tmp_path, log_interval=2))
    lines = read_metrics(tmp_path)
    assert lines == result["history"]
    assert [(r["kind"], r["iter"]) for r in lines] == [("eval", 0), ("train", 2), ("eval", 3), ("train", 4),
                                                       ("train", 6), ("eval", 6)]
    for r in lines:
        if r["kind"] == "train":
            assert {"loss", "lr", "ms_per_iter", "routed_frac", "predictor_accuracy", "predictor_balanced"} <= r.keys()
            assert r["routed_frac"] == 0.125 and r["loss"] > 0  # 4 of 32 tokens per routed block
        else:
            assert {"train_topk", "val_topk", "val_predictor", "predictor_accuracy", "predictor_recall",
                    "lr"} <= r.keys()
    assert {k: lines[-1][k] for k in result["eval"]} == result["eval"]
    times = [r["time_s"] for r in lines]
    assert times == sorted(times) and times[0] == 0 and times[-1] > 0
    assert all(r["wall_s"] >= r["time_s"] for r in lines)  # wall time includes the evaluations
    dense = train.main(**tiny_run(char_data, tmp_path / "dense", mod_every=0))
    assert "routed_frac" not in dense["history"][1] and "val_predictor" not in dense["history"][-1]


def test_a_resumed_run_appends_its_metrics_and_a_fresh_run_starts_a_new_file(char_data, tmp_path):
    first = train.main(**tiny_run(char_data, tmp_path / "a", log_interval=2))
    # as if the run had gone on past its last checkpoint and then crashed in the middle of a line
    with open(tmp_path / "a" / "metrics.jsonl", "a") as f:
        f.write(json.dumps(dict(kind="train", iter=7, time_s=99.0, wall_s=99.0, loss=1.0)) + "\n")
        f.write('{"kind": "eval", "it')
    resumed = train.main(**tiny_run(char_data, tmp_path / "a", log_interval=2, init_from="resume", max_iters=9,
                                    lr_decay_iters=9))
    lines = read_metrics(tmp_path / "a")
    assert lines == resumed["history"]
    assert lines[:5] == first["history"][:5]  # kept up to the checkpoint's iteration
    assert [(r["kind"], r["iter"]) for r in lines[5:]] == [("eval", 6), ("train", 8), ("eval", 9)]  # eval 6 once
    assert lines[-1]["time_s"] > first["history"][-1]["time_s"]  # the clock continues
    # a run from scratch in a folder with an old metrics file (and no checkpoint) starts a fresh one
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text(json.dumps(dict(kind="eval", iter=500)) + "\n")
    fresh = train.main(**tiny_run(char_data, tmp_path / "b", max_iters=3, eval_interval=3))
    assert read_metrics(tmp_path / "b") == fresh["history"] and fresh["history"][0]["iter"] == 0


# =============================================================================
# sample.py: generation from a checkpoint made here, routing display, agreement report, bad input

import sample  # noqa: E402


@pytest.fixture(scope="module")
def char_checkpoint(char_data, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("char_ckpt")
    train.main(**tiny_run(char_data, out_dir, max_iters=3))
    return str(out_dir)


def test_sample_from_a_char_checkpoint_with_routing_shown(char_checkpoint, capsys):
    report = sample.main(out_dir=char_checkpoint, start="First", num_samples=2, max_new_tokens=30,
                         show_routing=True, color="never", device="cpu")
    out = capsys.readouterr().out
    assert len(report["samples"]) == 2 and all(s.startswith("First") and len(s) == 35 for s in report["samples"])
    assert out.count("\nblock 1") >= 2  # a routing row under each line of each sample
    assert "tokens/s" in out and "KV cache at the end" in out and "agreement" in out
    assert report["tokens_per_s"] > 0 and 0 < report["kv_bytes"] < report["dense_kv_bytes"]
    assert [b["block"] for b in report["blocks"]] == [1]
    for b in report["blocks"]:
        assert 0 <= b["agreement"] <= 1 and 0 <= b["precision"] <= 1 and 0 <= b["recall"] <= 1
        assert 0 <= b["balanced"] <= 1


def test_sample_with_the_untrained_router_says_so_once(char_checkpoint, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model's own warning would be a second message: it must not come
        sample.main(out_dir=char_checkpoint, num_samples=1, max_new_tokens=5, routing="router", device="cpu")
    assert capsys.readouterr().out.count("router_aux_loss=0") == 1


def test_sample_from_a_bpe_checkpoint(tmp_path, capsys):
    (tmp_path / "input.txt").write_text(SMALL_TEXT * 20, encoding="utf-8")
    prepare("shakespeare", input_path=str(tmp_path / "input.txt"), out_dir=str(tmp_path / "data"))
    train.main(**tiny_run(str(tmp_path / "data"), tmp_path / "out", dataset="shakespeare", max_iters=2,
                          block_size=16, eval_iters=1))
    report = sample.main(out_dir=str(tmp_path / "out"), start="", num_samples=1, max_new_tokens=10, device="cpu",
                         show_routing=True, color="always")
    out = capsys.readouterr().out
    assert "empty prompt: starting from <|endoftext|>" in out
    assert report["samples"][0].startswith("<|endoftext|>")
    assert "[routed blocks a token went through:" in out and "\nblock 1" not in out  # colour, not the rows


def test_routing_display_in_plain_text():
    pieces = ["a", "b", "\n", "c", "d"]
    rows = [[True, False, True, False, True], [False, True, False, False, False]]
    assert sample.render_routing(pieces, rows, [1, 3], color=False) == "\n".join([
        "         ab",
        "block 1  ^ ^",  # the newline was routed: its mark sits one past the end of the line
        "block 3   ^",
        "         cd",
        "block 1   ^",
        "block 3"])
    shaded = sample.render_routing(pieces, rows, [1, 3], color=True)
    assert shaded.startswith("\033[48;5;153ma\033[0m")  # routed through one block: the lightest shade
    assert "\033[48;5;153m\u21b5\n\033[0m" in shaded and "c" in shaded


def test_agreement_report_counts_precision_and_recall(char_checkpoint):
    model, _ = sample.load_model(char_checkpoint, "cpu")
    idx = torch.randint(0, model.config.vocab_size, (2, 32))
    block = routed_blocks(model)[0]
    torch.nn.init.constant_(block.predictor.out.bias, 100.0)  # routes every token: top-k's 4 of 32 are all found
    stats = sample.topk_agreement(model, idx, "predictor")[0]
    assert stats["recall"] == 1.0 and stats["precision"] == pytest.approx(4 / 32)
    assert stats["agreement"] == pytest.approx(4 / 32) and stats["routed"] == 1.0
    assert stats["balanced"] == pytest.approx(0.5)  # all of top-k's picks, none of the tokens it skips
    torch.nn.init.constant_(block.predictor.out.bias, -100.0)  # routes nothing
    stats = sample.topk_agreement(model, idx, "predictor")[0]
    assert stats["recall"] == 0.0 and stats["precision"] == 0.0 and stats["agreement"] == pytest.approx(28 / 32)
    assert stats["balanced"] == pytest.approx(0.5)  # accuracy's 87.5% is what routing nothing scores


def test_sample_bad_input_gets_clear_messages(char_checkpoint, tmp_path, capsys):
    with pytest.raises(plumbing.ConfigError, match="no checkpoint at .*train one with python train.py"):
        sample.main(out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="characters not in the vocabulary: '%', '€'"):
        sample.main(out_dir=char_checkpoint, start="%€", device="cpu")
    report = sample.main(out_dir=char_checkpoint, start="", num_samples=1, max_new_tokens=5, device="cpu")
    assert "empty prompt: starting from a newline" in capsys.readouterr().out
    assert report["samples"][0].startswith("\n")
    long_prompt = tmp_path / "prompt.txt"
    long_prompt.write_text("First Citizen:\n" * 10, encoding="utf-8")  # 150 characters, context 32
    report = sample.main(out_dir=char_checkpoint, start=f"FILE:{long_prompt}", num_samples=1, max_new_tokens=5,
                         device="cpu")
    assert "150 tokens, more than the model's context of 32: it sees only the last 32" in capsys.readouterr().out
    assert len(report["samples"][0]) == 37
    run = subprocess.run([sys.executable, "sample.py", f"--out_dir={tmp_path}"], cwd=REPO, capture_output=True,
                         text=True)
    assert run.returncode != 0 and run.stderr.startswith("error: no checkpoint at") and "Traceback" not in run.stderr



# =============================================================================
# bench.py: it runs and reports (what it measures is reported by it, never asserted as timings here)

import bench  # noqa: E402


def test_calibrated_predictors_route_the_capacity():
    model = bench.build(dict(n_layer=4, n_head=2, n_embd=32, block_size=64), 2, "cpu").eval()
    bench.calibrate_predictors(model, "cpu")
    idx = torch.randint(0, bench.VOCAB, (8, 64), generator=torch.Generator().manual_seed(0))
    model(idx, routing="predictor")
    for routed in model.last_routing[1::2]:
        assert routed.float().mean().item() == pytest.approx(0.125, abs=0.01)


def test_textbook_reference_computes_what_our_dense_model_computes():
    dense = tiny(mod_every=0).train()
    textbook = bench.TextbookGPT(dense)
    idx, targets = torch.randint(0, 50, (3, 32)), torch.randint(0, 50, (3, 32))
    logits, loss = dense(idx, targets)
    ref_logits, ref_loss = textbook(idx, targets)
    assert torch.allclose(logits, ref_logits, atol=1e-5) and torch.allclose(loss, ref_loss, atol=1e-6)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(dense.parameters(), textbook.parameters()))


def test_bench_speed_reports_every_measure():
    shape = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_cpu=2, batch_gpu=2)
    text = "\n".join(bench.speed("tiny", shape, "cpu", "float32", ["eager"], repeats=1))
    for measure in ("| train step |", "| generate, batch 1 |", "| generate, batch 8 |", "forward GFLOPs, estimate",
                    "FlopCounterMode", "KV cache after generating", "| train step, textbook GPT as dense |"):
        assert measure in text
    assert "MoD/dense **0." in text  # the routed blocks' caches are smaller
    # the sentence on the textbook reference uses the training steps of the table, not another measure's times
    dense_ms = float(re.search(r"\| train step \| ([\d.]+) ms", text).group(1))
    textbook_ms = float(re.search(r"\| train step, textbook GPT as dense \| ([\d.]+) ms", text).group(1))
    ratio = float(re.search(r"Our dense training step takes ([\d.]+)x the time of the textbook", text).group(1))
    assert ratio == pytest.approx(dense_ms / textbook_ms, rel=0.05)  # the table rounds to 0.1 ms


def test_the_gpu_report_runs_end_to_end_on_a_cpu(monkeypatch):
    # python bench.py on a GPU: eager and compiled training steps side by side, MFU, the ops a step dispatches
    monkeypatch.setattr(bench, "peak_flops", lambda peak_tflops, device: 1e12)  # a CPU has no known peak
    shape = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_cpu=2, batch_gpu=2)
    text = "\n".join(bench.speed("tiny", shape, "cpu", "float32", ["eager", "compiled"], repeats=1))
    for measure in ("| train step |", "| train step, compiled |", "| train step, compiled, textbook GPT as dense |",
                    "| MFU, train step |", "| MFU, train step, compiled |", "| aten ops per train step (eager) |",
                    "| generate, batch 8 |"):
        assert measure in text, measure
    ops = re.search(r"\| aten ops per train step \(eager\) \| (\d+) \| (\d+) \|", text)
    dense_ops, mod_ops = int(ops.group(1)), int(ops.group(2))
    assert dense_ops < mod_ops < 2 * dense_ops  # the router, predictor, top-k, gathers and scatters of MoD


def test_bench_figures_draws_two_small_pictures_and_reuses_its_runs(char_data, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the figures need matplotlib: pip install matplotlib")
    settings = {k: v for k, v in tiny_run(char_data, tmp_path).items() if k not in ("out_dir", "device", "sample_tokens")}
    paths = bench.figures("cpu", folder=str(tmp_path / "figures"), runs_dir=str(tmp_path / "runs"), **settings)
    assert [os.path.basename(p) for p in paths] == ["loss_curves.png", "routing_map.png"]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert 5_000 < os.path.getsize(path) < 150_000
    assert (tmp_path / "runs" / "mod" / "metrics.jsonl").exists()
    bench.figures("cpu", folder=str(tmp_path / "figures"), runs_dir=str(tmp_path / "runs"), **settings)
    err = capsys.readouterr().err
    assert err.count("figures: training") == 2 and err.count("figures: resuming") == 2  # the second call reuses
    history = bench.run_history(str(tmp_path / "runs" / "mod"))
    assert [r["iter"] for r in history if r["kind"] == "eval"] == [0, 3, 6]  # resumed, not trained again


def test_routing_rates_count_what_top_k_routes():
    model = tiny()
    idx = torch.randint(0, 50, (16, 32), generator=torch.Generator().manual_seed(0))
    tokenizer = Tokenizer(dict(vocab_size=50, tokenizer="char", chars=[chr(48 + i) for i in range(50)]))
    table = bench.routed_token_rates(model, tokenizer, idx, min_count=1)
    model(idx, routing="topk")
    for row in table:  # each token's rate is its routed share of its occurrences, per routed block
        occurrences = idx == row["token"]
        assert row["count"] == occurrences.sum().item()
        for rate, i in zip(row["rates"], model.config.routed_blocks()):
            assert rate == pytest.approx((model.last_routing[i] & occurrences).sum().item() / row["count"])
    assert [row["mean"] for row in table] == sorted((row["mean"] for row in table), reverse=True)
    rows = bench.routing_rows(model, idx[:1])
    assert [block for block, _, _ in rows] == [1, 3] and all(topk.sum() == 8 for _, topk, _ in rows)


def test_val_windows_are_fixed_consecutive_slices_of_val_bin(char_data):
    windows = bench.val_windows(char_data, 16, 30)
    data = np.memmap(os.path.join(char_data, "val.bin"), dtype=np.uint16, mode="r").astype(np.int64)
    assert windows.shape == (30, 17) and windows.dtype == torch.long
    assert torch.equal(windows[0], torch.from_numpy(data[:17]))  # the first starts at 0 ...
    assert torch.equal(windows[-1], torch.from_numpy(data[-17:]))  # ... the last ends at the end of val.bin
    assert torch.equal(windows, bench.val_windows(char_data, 16, 30))  # the same windows for every model


def test_position_losses_are_the_per_token_cross_entropy():
    model = tiny()
    windows = torch.randint(0, 50, (10, 33), generator=torch.Generator().manual_seed(0))
    losses = bench.position_losses(model, windows, batch=4)  # three batches: 4, 4 and 2 windows
    assert losses.shape == (10, 32)
    _, loss = model(windows[:, :-1], windows[:, 1:])
    assert losses.mean().item() == pytest.approx(model.last_stats["lm_loss"].item(), abs=1e-5)
    logits, _ = model(windows[3:4, :-1], routing="predictor")
    expected = F.cross_entropy(logits[0], windows[3, 1:], reduction="none")
    assert torch.allclose(bench.position_losses(model, windows, "predictor")[3], expected, atol=1e-5)


def test_last_vs_middle_and_its_standard_error():
    losses = torch.zeros(40, 64)
    losses[:, -1] = 1.0
    losses[:, 32:62] = 0.25  # positions 32-61 are the middle; 62 is not
    losses[:, 62] = 9.0
    assert torch.allclose(bench.last_vs_middle(losses), torch.full((40,), 0.75))
    mean, se = bench.mean_se(torch.full((40,), 0.75))
    assert mean == pytest.approx(0.75) and se == pytest.approx(0.0)
    values = torch.arange(40.0)  # groups of 2: means 0.5, 2.5, ..., 38.5, spread sd / sqrt(20)
    mean, se = bench.mean_se(values, groups=20)
    assert mean == pytest.approx(19.5) and se == pytest.approx(torch.arange(0.5, 40, 2).std().item() / math.sqrt(20))


def test_routing_accuracy_compares_each_rule_with_top_k_on_the_same_input():
    model = tiny(router_aux_loss=0.1)  # trained for routing="router" (no warning)
    windows = torch.randint(0, 50, (6, 33), generator=torch.Generator().manual_seed(1))
    idx = windows[:, :-1]
    seen = capture_routing(model)
    for routing, rule in (("topk", "predictor"), ("predictor", "predictor"), ("router", "router"),
                          ("topk", "router")):
        seen.clear()
        model(idx, routing=routing)
        decided = [(info.predictor_logits if rule == "predictor" else info.router_logits) > 0 for _, _, info in seen]
        expected = [(d == info.topk).float().mean().item() for d, (_, _, info) in zip(decided, seen)]
        expected_balanced = [((d & info.topk).sum() / info.topk.sum() + (~d & ~info.topk).sum() / (~info.topk).sum())
                             .item() / 2 for d, (_, _, info) in zip(decided, seen)]
        expected_routed = [info.processed.float().mean().item() for _, _, info in seen]
        seen.clear()
        scores, routed = bench.routing_accuracy(model, windows, routing, rule=rule, batch=4)
        accuracy = [s["accuracy"] for s in scores]
        assert accuracy == pytest.approx(expected, abs=1e-6) and routed == pytest.approx(expected_routed, abs=1e-6)
        assert [s["balanced"] for s in scores] == pytest.approx(expected_balanced, abs=1e-6)
        assert len(accuracy) == 2
    # under top-k each block processes exactly k = 8 of 32 tokens; the causal rules route what they route
    assert bench.routing_accuracy(model, windows, "topk")[1] == pytest.approx([0.25, 0.25])


def test_figures_without_matplotlib_is_one_clear_line(tmp_path):
    fake = tmp_path / "no_matplotlib" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    env = dict(os.environ, PYTHONPATH=str(fake.parent))
    run = subprocess.run([sys.executable, "bench.py", "--figures", "--device=cpu"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr == "error: drawing needs matplotlib, which is optional: pip install matplotlib\n"


# =============================================================================
# tutorial.ipynb: run top to bottom in a real Jupyter kernel, at its tiny setting


def test_tutorial_notebook_runs_top_to_bottom_in_a_kernel(tmp_path, monkeypatch):
    reason = "running the notebook needs nbclient, ipykernel and matplotlib: pip install nbclient ipykernel matplotlib"
    for module in ("nbformat", "nbclient", "ipykernel", "matplotlib"):
        pytest.importorskip(module, reason=reason)
    import nbclient
    import nbformat
    notebook = nbformat.read(REPO / "tutorial.ipynb", as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)  # committed without outputs
    monkeypatch.setenv("MOD_TUTORIAL_SIZE", "tiny")
    monkeypatch.setenv("MOD_TUTORIAL_OUT", str(tmp_path / "runs"))
    # any cell that raises fails the test (CellExecutionError, with the cell and its traceback). nbclient waits only
    # 4 s by default for a cell's output after the cell has finished, then drops it with a warning: on a loaded
    # machine a printed claim could go missing. Wait up to 2 minutes, and fail loudly if it never comes.
    nbclient.NotebookClient(notebook, timeout=600, startup_timeout=300, iopub_timeout=120,
                            raise_on_iopub_timeout=True, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}}).execute()
    text = "".join(o.get("text", "") for cell in code for o in cell.outputs if o.output_type == "stream")
    for claim in ("the block processed exactly the top-k tokens: True",
                  "tokens that skip the block come out bit-identical: True",
                  "positions before 20 changed", "the past is unchanged: True", "val loss", "tokens/s",
                  "each expert processed exactly k tokens per row: True"):
        assert claim in text, claim
    # at the tiny size each conclusion says that its numbers mean nothing (the size only tests that every cell runs)
    assert text.count("size tiny: these models are too small") >= 3, text[-2000:]
    # the gradient table: the predictor's loss reaches only the predictor, the LM loss never the predictor
    grads = {line[:20].strip(): [float(v) for v in line[20:].split()] for line in text.splitlines()
             if line.strip().startswith(("predictor BCE", "LM loss"))}
    assert grads["predictor BCE"][0] > 0 and grads["predictor BCE"][1:] == [0.0, 0.0]
    assert grads["LM loss"][0] == 0.0 and grads["LM loss"][1] > 0 and grads["LM loss"][2] > 0
    pictures = [o for cell in code for o in cell.outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 3  # loss curves, routing map, most-routed tokens
    for run in ("mod", "dense"):
        assert (tmp_path / "runs" / run / "metrics.jsonl").exists()


# =============================================================================
# Nothing lost, nothing cryptic: every fault and bad input through the real command lines (a table), signals,
# the checkpoint policy (ckpt.pt the latest state, best.pt the best model), train.py --help, bf16/fp16 on a CPU

import hashlib  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from collections import namedtuple  # noqa: E402

PROJECT_MODULES = ("train", "mod", "sample", "bench", "plumbing", "data", "data.prepare")


def snapshot(folders):
    """{path: sha256 of its bytes} of every file under the folders (bytecode caches aside)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for folder in folders
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def run_scripts(cases_path):
    """Run each command line of the JSON file cases_path as `python script args...` would, one after the other in this
    process, and write what each did to cases_path + ".out": exit status, stdout, stderr, and the files it created,
    changed or removed in the folders it watches. Each script runs as __main__ with its own argv, working folder and
    environment, and imports the project afresh (from its own copy, if it has one); an exception it does not catch is
    printed as a traceback with exit status 1, as the interpreter does. One process for all: torch is imported once."""
    import contextlib
    import io
    import runpy
    import traceback
    with open(cases_path) as f:
        cases = json.load(f)
    base_path, base_env = list(sys.path), dict(os.environ)
    results = []
    for case in cases:
        for name in PROJECT_MODULES:
            sys.modules.pop(name, None)
        sys.path[:] = [os.path.dirname(case["script"])] + base_path[1:]
        os.environ.clear()
        os.environ.update(base_env)
        os.environ.update(case["env"])
        os.chdir(case["cwd"])
        sys.argv = [case["script"]] + case["args"]
        before = snapshot(case["watch"])
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(case["script"], run_name="__main__")
                status = 0
            except SystemExit as e:  # what the interpreter does with it
                status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if not isinstance(e.code, int) and e.code is not None:
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                status = 1
        after = snapshot(case["watch"])
        touched = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
        results.append(dict(status=status, stdout=out.getvalue(), stderr=err.getvalue(), touched=touched))
    with open(cases_path + ".out", "w") as f:
        json.dump(results, f)


def run_cases(cases, folder, timeout=900):
    """Run the command lines cases (see run_scripts) in one fresh process; returns what each did."""
    with open(folder / "cases.json", "w") as f:
        json.dump(cases, f)
    run = subprocess.run([sys.executable, "-c", "import sys, test_scripts; test_scripts.run_scripts(sys.argv[1])",
                          str(folder / "cases.json")], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(folder / "cases.json.out") as f:
        return json.load(f)


# A fault: the command line (the script, relative to the repository unless it starts with a placeholder, and its
# arguments), the pattern its one error line must match, and what to set up in the case's own folder {dir} first.
# Placeholders: {dir} the case's folder; {data} a good char dataset and {ckpt} a folder with a good checkpoint
# (ckpt.pt and best.pt), both shared and watched by every case; {model} tiny model and run settings (no data_dir or
# out_dir); {same_size} and {other_size} datasets whose vocabulary has the same / another size as {data}'s;
# {read_only} a folder this process cannot write to.
Fault = namedtuple("Fault", "id command pattern setup env", defaults=(None, None))

MODEL = ("--device=cpu --n_layer=2 --n_head=2 --n_embd=32 --block_size=32 --batch_size=8 --max_iters=2 "
         "--eval_interval=2 --eval_iters=1 --log_interval=1 --sample_tokens=0 --predictor_hidden=16")


def checkpoint_file(name, change):
    """A setup: {dir}/name is the good checkpoint, changed by change(dict)."""
    def setup(case_dir, assets):
        ckpt = torch.load(assets / "ckpt" / "ckpt.pt", weights_only=True)
        change(ckpt)
        torch.save(ckpt, case_dir / name)
    return setup


def nan_weights(ckpt):
    ckpt["model"]["lm_head.weight"][0, 0] = float("nan")


def text_file(name, content):
    def setup(case_dir, assets):
        (case_dir / name).write_bytes(content)
    return setup


def data_copy(change=None, without=None):
    """A setup: {dir}/data is a copy of the good dataset, without one of its files or with change(folder) done."""
    def setup(case_dir, assets):
        shutil.copytree(assets / "data", case_dir / "data")
        if without:
            (case_dir / "data" / without).unlink()
        if change:
            change(case_dir / "data")
    return setup


def checkpoints(*names):
    def setup(case_dir, assets):
        (case_dir / "out").mkdir()
        for name in names:
            shutil.copy(assets / "ckpt" / name, case_dir / "out" / name)
    return setup


def repo_copy(*data_files):
    """A setup: {dir}/repo is a copy of the project's code (so its default data folder, repo/data/shakespeare_char,
    is the case's own), holding the given files of the good dataset there."""
    def setup(case_dir, assets):
        for name in ("train.py", "mod.py", "sample.py", "bench.py", "plumbing.py", "data/__init__.py",
                     "data/prepare.py", "data/shakespeare_char/prepare.py", "data/shakespeare/prepare.py"):
            (case_dir / "repo" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / name, case_dir / "repo" / name)
        for name in data_files:
            shutil.copy(assets / "data" / name, case_dir / "repo" / "data" / "shakespeare_char" / name)
    return setup


def odd_train_bin(folder):
    with open(folder / "train.bin", "ab") as f:
        f.write(b"\x01")


def val_id_out_of_range(folder):
    ids = np.fromfile(folder / "val.bin", dtype=np.uint16)
    ids[5] = 60000
    ids.tofile(folder / "val.bin")


def meta_without_vocab_size(folder):
    meta = json.loads((folder / "meta.json").read_text())
    del meta["vocab_size"]
    (folder / "meta.json").write_text(json.dumps(meta))


def small_dataset(case_dir, assets):
    (case_dir / "small.txt").write_text(SMALL_TEXT)  # under 300 characters: under 32 validation tokens
    prepare("shakespeare_char", str(case_dir / "small.txt"), str(case_dir / "data"))


def wider_model_config(ckpt):
    ckpt["model_config"]["n_embd"] = 64  # the weights are 32 wide


TEN_BYTES = b"To be, or\n"
TRAIN = f"train.py {MODEL} --data_dir={{data}}"  # a scratch run on the good data; each row adds its --out_dir
RESUME = "train.py --device=cpu --init_from=resume"

FAULTS = [
    # train.py: settings
    Fault("unknown setting", "train.py --n_layers=3",
          r"^error: unknown setting --n_layers \(did you mean --n_layer\?\); the settings are the fields"),
    Fault("abbreviated setting", "train.py --max_iter=3", r"unknown setting --max_iter \(did you mean --max_iters\?\)"),
    Fault("not --key=value", "train.py max_iters=3", r"cannot read argument 'max_iters=3': write settings as --key="),
    Fault("flag without its value", "train.py --max_iters", r"argument --max_iters: expected one argument"),
    Fault("same flag twice", f"{TRAIN} --out_dir={{dir}} --seed=1 --seed=2", r"--seed is given 2 times: give it once"),
    Fault("int that is no int", f"{TRAIN} --out_dir={{dir}} --seed=ten", r"--seed expects int, got 'ten'"),
    Fault("bool that is no bool", f"{TRAIN} --out_dir={{dir}} --compile=maybe", r"--compile expects bool"),
    Fault("beta1=2", f"{TRAIN} --out_dir={{dir}} --beta1=2", r"--beta1 must be in \[0, 1\)"),
    Fault("learning_rate=inf", f"{TRAIN} --out_dir={{dir}} --learning_rate=inf",
          r"--learning_rate must be a finite number, got 'inf'"),
    Fault("dropout=nan", f"{TRAIN} --out_dir={{dir}} --dropout=nan", r"--dropout must be a finite number"),
    Fault("vocab_size from scratch", f"{TRAIN} --out_dir={{dir}} --vocab_size=10",
          r"--vocab_size=10 cannot be set: the vocabulary comes from the data"),
    Fault("warmup_iters=-1", f"{TRAIN} --out_dir={{dir}} --warmup_iters=-1", r"--warmup_iters must be >= 0, got -1"),
    Fault("unknown dataset", f"{TRAIN} --out_dir={{dir}} --dataset=shakespeare_word",
          r"--dataset must be shakespeare_char or shakespeare"),
    Fault("unknown device", "train.py --device=gpu", r"--device=gpu is not a device: use cpu, cuda"),
    Fault("unknown dtype", f"{TRAIN} --out_dir={{dir}} --dtype=float64", r"--dtype must be auto, float32, bfloat16"),
    Fault("model setting out of range", f"{TRAIN} --out_dir={{dir}} --capacity=0", r"capacity must be in \(0, 1\]"),
    Fault("dropout=1", f"{TRAIN} --out_dir={{dir}} --dropout=1", r"dropout must be in \[0, 1\), got 1.0"),
    # train.py: out_dir
    Fault("out_dir empty", f"{TRAIN} --out_dir=", r"--out_dir is empty: name a folder"),
    Fault("out_dir is a file", f"{TRAIN} --out_dir={{dir}}/file", r"--out_dir=.*/file is a file, not a folder",
          text_file("file", b"not a folder")),
    Fault("out_dir inside a file", f"{TRAIN} --out_dir={{dir}}/file/out", r"cannot write to --out_dir=.*/file/out",
          text_file("file", b"not a folder")),
    Fault("out_dir read-only", f"{TRAIN} --out_dir={{read_only}}", r"cannot write to --out_dir=.*choose a folder"),
    Fault("scratch run over a checkpoint", f"{TRAIN} --out_dir={{dir}}/out",
          r"holds ckpt.pt and best.pt of an earlier run.*--init_from=resume.*another --out_dir.*--overwrite=True",
          checkpoints("ckpt.pt", "best.pt")),
    Fault("scratch run over a lone best.pt", f"{TRAIN} --out_dir={{dir}}/out", r"holds best.pt of an earlier run",
          checkpoints("best.pt")),
    # train.py: resume
    Fault("resume without a checkpoint", f"{RESUME} --out_dir={{dir}}", r"no checkpoint at .*ckpt.pt: train one first"),
    Fault("resume a corrupt checkpoint", f"{RESUME} --out_dir={{dir}}", r"ckpt.pt is not a readable checkpoint",
          text_file("ckpt.pt", b"half a checkpoint")),
    Fault("resume without rng_state", f"{RESUME} --out_dir={{dir}}", r"ckpt.pt is not a checkpoint of this train.py "
          r"\(missing \['rng_state'\]\)", checkpoint_file("ckpt.pt", lambda c: c.pop("rng_state"))),
    Fault("resume without meta", f"{RESUME} --out_dir={{dir}}", r"\(missing \['meta'\]\)",
          checkpoint_file("ckpt.pt", lambda c: c.pop("meta"))),
    Fault("resume a checkpoint whose model is no dict", f"{RESUME} --out_dir={{dir}}",
          r"ckpt.pt is damaged \(model is no dict\)", checkpoint_file("ckpt.pt", lambda c: c.update(model=[1, 2]))),
    Fault("resume NaN weights", f"{RESUME} --out_dir={{dir}}", r"ckpt.pt holds non-finite weights",
          checkpoint_file("ckpt.pt", nan_weights)),
    Fault("resume weights that do not fit", f"{RESUME} --out_dir={{dir}}", r"ckpt.pt does not fit this model",
          checkpoint_file("ckpt.pt", wider_model_config)),
    Fault("resume with another n_layer", f"{RESUME} --out_dir={{ckpt}} --n_layer=3",
          r"the checkpoint was trained with n_layer=2, not 3: drop --n_layer"),
    Fault("resume with --vocab_size", f"{RESUME} --out_dir={{ckpt}} --vocab_size=10",
          r"the checkpoint was trained with vocab_size=\d+, not 10: drop --vocab_size"),
    Fault("resume on other text, same vocab size", f"{RESUME} --out_dir={{ckpt}} --data_dir={{same_size}}",
          r"vocabulary is not the one of .*same_size \(both have \d+ tokens, but different ones\)"),
    Fault("resume on a vocab of another size", f"{RESUME} --out_dir={{ckpt}} --data_dir={{other_size}}",
          r"the checkpoint's vocabulary has \d+ tokens but .*other_size has \d+"),
    # train.py: data
    Fault("data_dir missing", f"train.py {MODEL} --data_dir={{dir}}/none --out_dir={{dir}}/out",
          r"holds no train.bin/val.bin/meta.json: prepare it with python data/shakespeare_char/prepare.py --out_dir="),
    Fault("partial dataset, no meta.json", f"train.py {MODEL} --data_dir={{dir}}/data --out_dir={{dir}}/out",
          r"holds train.bin and val.bin but no meta.json: a partial dataset.*prepare.py", data_copy(without="meta.json")),
    Fault("train.bin odd byte count", f"train.py {MODEL} --data_dir={{dir}}/data --out_dir={{dir}}/out",
          r"/train.bin has an odd number of bytes", data_copy(odd_train_bin)),
    Fault("val.bin id out of range", f"train.py {MODEL} --data_dir={{dir}}/data --out_dir={{dir}}/out",
          r"/val.bin holds token id 60000, but the vocabulary in meta.json has", data_copy(val_id_out_of_range)),
    Fault("meta.json without vocab_size", f"train.py {MODEL} --data_dir={{dir}}/data --out_dir={{dir}}/out",
          r"meta.json has no valid vocab_size", data_copy(meta_without_vocab_size)),
    Fault("meta.json not JSON", f"train.py {MODEL} --data_dir={{dir}}/data --out_dir={{dir}}/out",
          r"meta.json is not valid JSON", data_copy(lambda folder: (folder / "meta.json").write_text("{oops"))),
    Fault("too few tokens for block_size", f"train.py {MODEL} --data_dir={{dir}}/data --out_dir={{dir}}/out",
          r"val.bin holds \d+ tokens, too few for block_size 32: .*prepare.py --out_dir=.* --input=PATH",
          small_dataset),
    Fault("default data, a 10-byte text", f"{{dir}}/repo/train.py {MODEL} --out_dir={{dir}}/out",
          r"ten.txt \(10 characters\) gives 9 training tokens, too few .*nothing was written", repo_copy(),
          {"SHAKESPEARE_TXT": "{dir}/ten.txt"}),
    Fault("default data, partial", f"{{dir}}/repo/train.py {MODEL} --out_dir={{dir}}/out",
          r"holds train.bin but no val.bin or meta.json: a partial dataset", repo_copy("train.bin")),
    # sample.py
    Fault("sample, no checkpoint", "sample.py --out_dir={dir}", r"no checkpoint at .*best.pt: train one"),
    Fault("sample, no latest", "sample.py --out_dir={dir}/out --checkpoint=latest", r"no checkpoint at .*ckpt.pt",
          checkpoints("best.pt")),
    Fault("sample, corrupt checkpoint", "sample.py --out_dir={dir}", r"best.pt is not a readable checkpoint",
          text_file("best.pt", b"\x00" * 100)),
    Fault("sample, checkpoint without meta", "sample.py --out_dir={dir}", r"\(missing \['meta'\]\)",
          checkpoint_file("best.pt", lambda c: c.pop("meta"))),
    Fault("sample, config does not fit", "sample.py --out_dir={dir}", r"holds a model this mod.py cannot build",
          checkpoint_file("best.pt", wider_model_config)),
    Fault("sample, NaN weights", "sample.py --out_dir={dir}", r"best.pt holds non-finite weights",
          checkpoint_file("best.pt", nan_weights)),
    Fault("sample, not a number", "sample.py --out_dir={ckpt} --num_samples=x",
          r"argument --num_samples: invalid int value: 'x'"),
    Fault("sample, zero samples", "sample.py --out_dir={ckpt} --num_samples=0", r"--num_samples .* must be >= 1"),
    Fault("sample, NaN temperature", "sample.py --out_dir={ckpt} --device=cpu --temperature=nan",
          r"temperature must be >= 0, a finite number"),
    Fault("sample, top-k routing", "sample.py --out_dir={ckpt} --routing=topk", r"invalid choice: 'topk'"),
    Fault("sample, missing prompt file", "sample.py --out_dir={ckpt} --device=cpu --start=FILE:{dir}/none.txt",
          r"cannot read the prompt file .*none.txt"),
    Fault("sample, unknown device", "sample.py --out_dir={ckpt} --device=foo", r"--device=foo is not a device"),
    Fault("sample, same flag twice", "sample.py --out_dir={ckpt} --top_k=5 --top_k=6", r"--top_k is given 2 times"),
    Fault("sample, unknown --checkpoint", "sample.py --out_dir={ckpt} --checkpoint=last", r"invalid choice: 'last'"),
    # bench.py
    Fault("bench, unknown device", "bench.py --device=foo", r"--device=foo is not a device"),
    Fault("bench, repeats=0", "bench.py --repeats=0", r"--repeats must be >= 1, got 0"),
    Fault("bench, quality_iters=0", "bench.py --quality_iters=0", r"--quality_iters must be >= 1"),
    Fault("bench, --out in a missing folder", "bench.py --out={dir}/none/bench.md", r"there is no folder .*none"),
    Fault("bench, --out is a folder", "bench.py --out={dir}", r"--out=.* is a folder: name a file"),
    Fault("bench, unknown shape", "bench.py --shapes=huge", r"unknown shape\(s\) \['huge'\]"),
    Fault("bench, same flag twice", "bench.py --repeats=1 --repeats=2", r"--repeats is given 2 times"),
    # data/*/prepare.py
    Fault("prepare, missing input", "data/shakespeare_char/prepare.py --input={dir}/none.txt --out_dir={dir}/data",
          r"--input names .*none.txt.*which is not a file"),
    Fault("prepare, 10-byte text over good data", "data/shakespeare_char/prepare.py --input={dir}/ten.txt "
          "--out_dir={dir}/data", r"gives 1 validation tokens, too few.*nothing was written",
          lambda case_dir, assets: (text_file("ten.txt", TEN_BYTES)(case_dir, assets), data_copy()(case_dir, assets))),
    Fault("prepare, not UTF-8", "data/shakespeare_char/prepare.py --input={dir}/latin1.txt --out_dir={dir}/data",
          r"latin1.txt is not UTF-8 text", text_file("latin1.txt", "Romeo\xe9\n".encode("latin-1") * 50)),
    Fault("prepare, out_dir is a file", "data/shakespeare_char/prepare.py --input={dir}/in.txt --out_dir={dir}/in.txt",
          r"cannot write to .*in.txt", text_file("in.txt", SMALL_TEXT.encode())),
    Fault("prepare, unknown flag", "data/shakespeare_char/prepare.py --inpt=x",
          r"unknown setting --inpt \(did you mean --input\?\); python data/shakespeare_char/prepare.py --help"),
    Fault("prepare, same flag twice", "data/shakespeare_char/prepare.py --input={dir}/a --input={dir}/b",
          r"--input is given 2 times: give it once"),
    Fault("prepare BPE, empty text", "data/shakespeare/prepare.py --input={dir}/empty.txt --out_dir={dir}/data",
          r"empty.txt is empty", text_file("empty.txt", b"")),
]


def read_only_folder(root):
    """A folder this process cannot write to: a read-only one, or /sys for root, whom permission bits do not stop."""
    folder = root / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            plumbing.check_writable(candidate)
        except OSError:
            return candidate
    return None


@pytest.fixture(scope="module")
def fault_runs(char_data, tmp_path_factory):
    """Set up every fault of FAULTS in a folder of its own, run them all (run_scripts), return {id: what it did}."""
    root = tmp_path_factory.mktemp("faults")
    assets = root / "assets"
    shutil.copytree(char_data, assets / "data")
    train.main(**tiny_run(str(assets / "data"), assets / "ckpt", max_iters=2, eval_interval=2, eval_iters=1))
    text = (Path(char_data).parent / "input.txt").read_text()
    for name, other in (("same_size", text.replace("a", "@")), ("other_size", text.replace("a", ""))):
        (root / f"{name}.txt").write_text(other)
        prepare("shakespeare_char", str(root / f"{name}.txt"), str(assets / name))
    read_only = read_only_folder(root)
    places = dict(data=assets / "data", ckpt=assets / "ckpt", same_size=assets / "same_size",
                  other_size=assets / "other_size", read_only=read_only, model=MODEL)
    cases = []
    for n, fault in enumerate(FAULTS):
        case_dir = root / f"case{n}"
        case_dir.mkdir()
        if fault.setup:
            fault.setup(case_dir, assets)
        (case_dir / "ten.txt").write_bytes(TEN_BYTES)
        fill = lambda text: text.format(dir=case_dir, **places)  # noqa: E731
        script, *args = shlex.split(fill(fault.command))
        cases.append(dict(script=str(REPO / script) if not os.path.isabs(script) else script, args=args,
                          cwd=str(case_dir), env={k: fill(v) for k, v in (fault.env or {}).items()},
                          watch=[str(case_dir), str(assets)]))
    results = run_cases(cases, root)
    return {fault.id: (result, read_only) for fault, result in zip(FAULTS, results)}


@pytest.mark.parametrize("fault", FAULTS, ids=[fault.id for fault in FAULTS])
def test_a_fault_ends_in_one_clear_line_and_changes_no_file(fault, fault_runs):
    result, read_only = fault_runs[fault.id]
    if "{read_only}" in fault.command and read_only is None:
        pytest.skip("no folder here is read-only to this process")
    output = result["stdout"] + result["stderr"]
    assert result["status"] != 0, output
    assert "Traceback" not in output, output
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result["stderr"]
    assert re.search(fault.pattern, lines[0]), lines[0]
    assert result["touched"] == []  # no checkpoint, dataset or other file created, changed or removed


def test_the_fault_table_is_large_enough():
    assert len(FAULTS) >= 40 and len({fault.id for fault in FAULTS}) == len(FAULTS)


def start_training(args, cwd=REPO):
    """train.py in a subprocess, its output unbuffered so that its lines can be waited for; one thread, which is all
    a tiny model needs and all a shared machine should give it."""
    return subprocess.Popen([sys.executable, "-u", "train.py", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_line(proc, text, timeout=120):
    """Read proc's output until a line holding text (returns everything read so far)."""
    seen, deadline = "", time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
        if text in line:
            return seen
    proc.kill()
    raise AssertionError(f"never printed {text!r}:\n{seen}")


def test_sigterm_saves_like_ctrl_c_and_exits_143(char_data, tmp_path):
    args = [f"--{k}={v}" for k, v in tiny_run(char_data, tmp_path, max_iters=100000, eval_interval=100000).items()]
    proc = start_training(args)
    seen = wait_for_line(proc, "iter 2:")  # training has started
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    output = seen + rest
    assert proc.returncode == 143, output  # 128 + 15, as shells report a process stopped by SIGTERM
    assert "Traceback" not in output
    stopped_at = int(re.search(r"SIGTERM: stopped at iteration (\d+)", output).group(1))
    assert f"saved {tmp_path / 'ckpt.pt'}; continue with --init_from=resume" in output
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == stopped_at >= 2  # whole iterations only
    assert not (tmp_path / "best.pt").exists()  # no evaluation since iteration 0: no best model to save


def test_nan_weights_then_ctrl_c_keep_the_good_checkpoints(char_data, tmp_path):
    train.main(**tiny_run(char_data, tmp_path, max_iters=3))
    before = {name: (tmp_path / name).read_bytes() for name in ("ckpt.pt", "best.pt")}
    # lr 1e6 without clipping: NaN weights within two iterations; no evaluation or log line notices it
    args = [f"--{k}={v}" for k, v in tiny_run(char_data, tmp_path, init_from="resume", learning_rate=1e6, min_lr=0,
                                               decay_lr=False, grad_clip=0, max_iters=100000, eval_interval=100000,
                                               log_interval=100000).items()]
    proc = start_training(args)
    seen = wait_for_line(proc, "tokens per iteration")  # the last line before the training loop
    time.sleep(4)  # dozens of iterations of this tiny model even on a busy machine (2 make its weights NaN)
    proc.send_signal(signal.SIGINT)  # a real Ctrl-C
    rest, _ = proc.communicate(timeout=120)
    output = seen + rest
    assert proc.returncode == 130, output  # 128 + 2: interrupted, so `train.py && sample.py` stops here
    assert "Traceback" not in output
    assert "not saved: the weights are not finite (NaN or inf)" in output
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # both good checkpoints intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "ckpt.pt", "metrics.jsonl"]
    sample.main(out_dir=str(tmp_path), num_samples=1, max_new_tokens=5, device="cpu")  # still usable


def test_a_second_ctrl_c_lets_the_save_in_progress_finish(char_data, tmp_path, monkeypatch):
    settings = dict(max_iters=8, lr_decay_iters=8, eval_interval=4)
    real_for_iteration, real_save = train.Batches.for_iteration, torch.save

    def ctrl_c_during_iteration_5(self, it):
        if it == 5:
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: finish iteration 5, save, stop
        return real_for_iteration(self, it)

    def ctrl_c_again_while_saving(obj, path):
        if obj["iter_num"] == 6:
            os.kill(os.getpid(), signal.SIGINT)  # the second, impatient one, in the middle of that save
        real_save(obj, path)
    monkeypatch.setattr(train.Batches, "for_iteration", ctrl_c_during_iteration_5)
    monkeypatch.setattr(torch, "save", ctrl_c_again_while_saving)
    with pytest.raises(KeyboardInterrupt):  # it stops at once ...
        train.main(**tiny_run(char_data, tmp_path, **settings))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == 6  # ... after the save finished
    # and no temporary file is left (metrics.jsonl is the run's log)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "ckpt.pt", "metrics.jsonl"]

    def sigterm_during_iteration_5(self, it):
        if it == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_for_iteration(self, it)
    monkeypatch.setattr(train.Batches, "for_iteration", sigterm_during_iteration_5)
    monkeypatch.setattr(torch, "save", real_save)
    result = train.main(**tiny_run(char_data, tmp_path / "term", **settings))
    assert result["interrupted"] and result["signal"] == "SIGTERM" and result["iter_num"] == 6  # main() returns
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the usual SIGTERM is back


def test_best_pt_keeps_the_best_model_and_sample_loads_it(char_data, tmp_path, monkeypatch, capsys):
    # evaluations scripted: val loss 3.0 at iteration 2, 2.0 at 4 (the best), 2.5 at 6; after a resume 2.5, 2.4
    val_losses = iter([9.0, 3.0, 2.0, 2.5, 2.5, 2.4])
    monkeypatch.setattr(train, "evaluate", lambda *args: dict(train_topk=1.0, val_topk=next(val_losses)))
    result = train.main(**tiny_run(char_data, tmp_path, mod_every=0, eval_interval=2))
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    latest = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert best["iter_num"] == 4 and best["best_val_loss"] == 2.0  # the worse model of iteration 6 did not replace it
    assert latest["iter_num"] == 6 and latest["best_val_loss"] == 2.0  # ckpt.pt: the latest state, to resume
    assert result["best_path"] == str(tmp_path / "best.pt")
    # a resume that only gets worse leaves best.pt alone too
    best_bytes = (tmp_path / "best.pt").read_bytes()
    train.main(**tiny_run(char_data, tmp_path, mod_every=0, eval_interval=2, max_iters=8, lr_decay_iters=8,
                          init_from="resume"))
    assert (tmp_path / "best.pt").read_bytes() == best_bytes
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == 8
    # sample.py loads best.pt unless asked for the latest state
    capsys.readouterr()
    model, _ = sample.load_model(str(tmp_path), "cpu")
    assert torch.equal(model.lm_head.weight, best["model"]["lm_head.weight"])
    model, _ = sample.load_model(str(tmp_path), "cpu", checkpoint="latest")
    assert not torch.equal(model.lm_head.weight, best["model"]["lm_head.weight"])
    (tmp_path / "best.pt").unlink()  # before the first evaluation there is no best.pt: ckpt.pt, with a note
    sample.load_model(str(tmp_path), "cpu")
    assert "no best.pt in" in capsys.readouterr().out


def test_overwrite_lets_a_scratch_run_start_over(char_data, tmp_path, capsys):
    train.main(**tiny_run(char_data, tmp_path, max_iters=3))
    with pytest.raises(plumbing.ConfigError, match="--init_from=resume, train into another --out_dir, or start over "
                                                "with --overwrite=True"):
        train.main(**tiny_run(char_data, tmp_path, max_iters=3))
    result = train.main(**tiny_run(char_data, tmp_path, max_iters=1, eval_interval=1, overwrite=True))
    assert "removed" in capsys.readouterr().out
    assert torch.load(result["ckpt_path"], weights_only=True)["iter_num"] == 1
    assert torch.load(tmp_path / "best.pt", weights_only=True)["iter_num"] == 1  # not the earlier run's


def test_two_runs_saving_into_one_out_dir_never_collide(tmp_path, monkeypatch):
    real_save = torch.save
    path = str(tmp_path / "ckpt.pt")

    def another_run_saves_meanwhile(obj, f):
        real_save(obj, f)
        if obj == "ours":  # our temporary file is written; before we rename it, another run saves the same path
            plumbing.save_checkpoint(path, "theirs")
    monkeypatch.setattr(torch, "save", another_run_saves_meanwhile)
    plumbing.save_checkpoint(path, "ours")  # with one shared ckpt.pt.tmp, the other run renamed ours away: a crash
    assert torch.load(path, weights_only=True) == "ours" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_the_default_data_folder_is_prepared_only_when_empty(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dp, "HERE", str(tmp_path / "data"))  # data/shakespeare_char under tmp_path
    folder = tmp_path / "data" / "shakespeare_char"
    run = tiny_run("", tmp_path / "out", max_iters=0)
    (tmp_path / "ten.txt").write_bytes(TEN_BYTES)
    monkeypatch.setenv("SHAKESPEARE_TXT", str(tmp_path / "ten.txt"))
    with pytest.raises(DataError, match="ten.txt .* too few .*nothing was written"):
        train.main(**run)
    assert not folder.exists() or list(folder.iterdir()) == []  # so it does not stick: fix the text, run again
    (tmp_path / "verse.txt").write_text("".join(VERSES) * 40)
    monkeypatch.setenv("SHAKESPEARE_TXT", str(tmp_path / "verse.txt"))
    train.main(**run)
    assert "preparing shakespeare_char" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    before = (folder / "train.bin").read_bytes()
    (folder / "meta.json").unlink()
    with pytest.raises(DataError, match="a partial dataset"):  # not prepared over: train.bin may be the user's
        train.main(**run)
    assert (folder / "train.bin").read_bytes() == before


def test_train_help_lists_every_setting_with_type_default_and_meaning():
    run = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"})  # one line per setting
    assert run.returncode == 0 and run.stderr == ""
    for title in ("I/O (TrainConfig)", "data and optimisation (TrainConfig)", "system (TrainConfig)",
                  "model (MoDConfig in mod.py)", "Mixture-of-Depths (MoDConfig in mod.py)"):
        assert f"\n{title}:\n" in run.stdout
    for config in (train.TrainConfig, MoDConfig):
        for field in fields(config):
            kind = field.type.__name__
            line = re.search(rf"^  --{field.name} \[?{kind}\]?\s+(\S.*)$", run.stdout, re.MULTILINE)
            assert line, f"--{field.name} {kind} is not listed"
            meaning, default = re.fullmatch(r"(.+) \(default: (.+)\)", line.group(1)).groups()
            assert len(meaning) > 10, field.name
            if field.name != "vocab_size":
                shown = '""' if field.default == "" else str(field.default)
                assert shown in default or field.name in train.GPU_DEFAULTS, (field.name, default)
    assert re.search(r"--batch_size int +.*\(default: 64 on a GPU, 12 on a CPU\)", run.stdout)  # the presets


def test_each_setting_has_its_meaning_written_once():
    # --help's meanings are the comments beside the fields, read from the source: each field exactly once, in the
    # dataclass's order, so a new field without a comment fails here
    for config in (train.TrainConfig, MoDConfig):
        groups = plumbing.setting_groups(config)
        listed = [name for _, entries in groups for name, _ in entries]
        assert listed == [field.name for field in fields(config)]
        assert all(len(meaning) > 10 for _, entries in groups for _, meaning in entries)


def test_eval_only_writes_nothing(char_data, tmp_path):
    train.main(**tiny_run(char_data, tmp_path / "run", max_iters=3))
    before = snapshot([tmp_path])
    for init_from in ("scratch", "resume"):  # a scratch eval-only run may look at a folder with checkpoints
        result = train.main(**tiny_run(char_data, tmp_path / "run", init_from=init_from, eval_only=True))
        assert [r["kind"] for r in result["history"]][-1] == "eval"  # the evaluation, returned, not written
    train.main(**tiny_run(char_data, tmp_path / "none", eval_only=True))  # an out_dir that does not exist
    assert snapshot([tmp_path]) == before and not (tmp_path / "none").exists()


def test_flags_as_key_value_or_key_space_value():
    assert train.parse_args(["--max_iters", "200", "--dataset=shakespeare"]) == {"max_iters": "200",
                                                                                 "dataset": "shakespeare"}
    assert train.parse_args(["--compile", "--eval_only=False"]) == {"compile": "True", "eval_only": "False"}
    assert train.parse_args([]) == {}  # nothing asked: the device's preset decides
    with pytest.raises(plumbing.ConfigError, match="--max_iters is given 2 times"):
        train.parse_args(["--max_iters=1", "--max_iters", "2"])


def cpu_autocast_works(dtype):
    try:
        with torch.autocast("cpu", dtype=dtype):
            torch.ones(2, 2) @ torch.ones(2, 2)
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_training_on_a_cpu(char_data, tmp_path, dtype, capsys):
    if not cpu_autocast_works(getattr(torch, dtype)):
        pytest.skip(f"this torch has no CPU autocast for {dtype}")
    result = train.main(**tiny_run(char_data, tmp_path, dtype=dtype, max_iters=4, eval_interval=4))
    assert f"device cpu, {dtype}," in capsys.readouterr().out  # the autocast path, not float32
    assert all(math.isfinite(v) for v in result["eval"].values())
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["train_config"]["dtype"] == dtype
    assert bool(ckpt["scaler"]) == (dtype == "float16")  # a GradScaler for float16 only


def test_auto_dtype_stays_float32_on_a_cpu():
    assert train.pick_dtype("auto", "cpu") == "float32" and train.pick_dtype("bfloat16", "cpu") == "bfloat16"


def test_grad_scaler_state_survives_a_checkpoint_and_resume(char_data, tmp_path):
    if not cpu_autocast_works(torch.float16):
        pytest.skip("this torch has no CPU autocast for float16")
    settings = dict(dtype="float16", max_iters=6, eval_interval=3)
    straight = train.main(**tiny_run(char_data, tmp_path / "a", **settings))
    train.main(**tiny_run(char_data, tmp_path / "b", **{**settings, "max_iters": 3}))
    resumed = train.main(**tiny_run(char_data, tmp_path / "b", init_from="resume", **settings))
    a = torch.load(straight["ckpt_path"], weights_only=True)
    b = torch.load(resumed["ckpt_path"], weights_only=True)
    # the scaler counts its steps since the last overflow; a fresh scaler after the resume would count from 0
    assert a["scaler"]["_growth_tracker"] > 3 and a["scaler"] == b["scaler"]
    assert all(torch.equal(a["model"][name], b["model"][name]) for name in a["model"])
