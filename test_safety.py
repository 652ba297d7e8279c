"""Safe by construction: one test per class of fault, through the real entry points (subprocesses for the command
lines, real signals, real concurrent processes, a real memory limit, real torchrun). Each asserts no traceback, one
line, and the files as they must be. The table of single faults is test_scripts.py's."""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import train
from data.prepare import prepare
from mod import MoDConfig
from test_scripts import char_data  # noqa: F401 (a fixture)
from test_scripts import REPO, VERSES, run_cases, snapshot, start_training, tiny_run, wait_for_line


def flags(settings):
    return [f"--{k}={v}" for k, v in settings.items()]


def one_error_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


# -----------------------------------------------------------------------------
# 1. two runs in one out_dir: a lock for the whole run, refused in one line naming the holder; a dead holder never
#    blocks


def test_a_second_run_in_the_same_out_dir_is_refused_while_the_first_lives(char_data, tmp_path):
    first = start_training(flags(tiny_run(char_data, tmp_path, max_iters=100000, eval_interval=3)))
    wait_for_line(first, f"saved {tmp_path / 'ckpt.pt'}")
    for second in (dict(init_from="resume"), dict(overwrite=True)):  # a resume, and a scratch run that may overwrite
        run = subprocess.run([sys.executable, "train.py", *flags(tiny_run(char_data, tmp_path, **second))], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 1, run.stdout + run.stderr
        assert re.search(rf"is in use by another run \(process {first.pid}: .*train.py", one_error_line(run.stderr))
    assert (tmp_path / "ckpt.pt").exists() and (tmp_path / "best.pt").exists()  # nothing removed by --overwrite
    first.kill()  # SIGKILL: no handler runs; the kernel drops the lock with the process
    first.communicate(timeout=60)
    after = torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"]
    resumed = subprocess.run([sys.executable, "train.py", *flags(tiny_run(char_data, tmp_path, init_from="resume",
                                                                           max_iters=after + 2))],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == after + 2


# -----------------------------------------------------------------------------
# 2. the unexpected: one line, the traceback in a file the line names; training saves what it had, like Ctrl-C


def test_out_of_memory_is_one_line_naming_the_traceback_file(char_data, tmp_path):
    def limit_memory():  # 3 GiB of address space: torch and a tiny model fit, ten million sequences do not
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
    run = subprocess.run([sys.executable, "train.py", *flags(tiny_run(char_data, tmp_path, batch_size=10_000_000))],
                         cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=limit_memory)
    assert run.returncode == 1
    line = one_error_line(run.stderr)
    assert "out of memory" in line and "--batch_size" in line, line
    path = re.search(r"the full traceback is in (\S+\.txt)", line).group(1)
    assert "Traceback" in Path(path).read_text()
    os.remove(path)


def test_an_unexpected_error_mid_run_saves_the_latest_state_and_a_resume_continues_exactly(char_data, tmp_path,
                                                                                            monkeypatch):
    settings = dict(dropout=0.1, max_iters=8, lr_decay_iters=8, eval_interval=4)
    straight = train.main(**tiny_run(char_data, tmp_path / "a", **settings))
    real_log_values = train.log_values

    def fails_at_iteration_6(model, cfg, it, *args):
        if it == 6:
            raise RuntimeError("a device error nobody foresaw")
        return real_log_values(model, cfg, it, *args)
    monkeypatch.setattr(train, "log_values", fails_at_iteration_6)
    with pytest.raises(RuntimeError, match="nobody foresaw"):
        train.main(**tiny_run(char_data, tmp_path / "b", **settings))
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["iter_num"] == 6  # not 4, the last evaluation
    monkeypatch.undo()
    resumed = train.main(**tiny_run(char_data, tmp_path / "b", init_from="resume", **settings))
    a = torch.load(straight["ckpt_path"], weights_only=True)["model"]
    b = torch.load(resumed["ckpt_path"], weights_only=True)["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)  # the saved state was whole: the resume is exact


@pytest.mark.parametrize("module,planted,entry", [
    ("train", "load_data", "train.cli(argv)"), ("sample", "load_model", "sample.cli(argv)"),
    ("bench", "run", "bench.main(argv)"), ("data.prepare", "prepare", "data.prepare.main('shakespeare_char', argv)")])
def test_every_command_line_ends_anything_unexpected_in_one_line(module, planted, entry, tmp_path):
    # something nobody foresaw: here a ZeroDivisionError planted where the script starts its work
    code = f"import sys, {module}\n{module}.{planted} = lambda *args, **kwargs: 1 / 0\nargv = sys.argv[1:]\n{entry}\n"
    args = {"train": [f"--out_dir={tmp_path / 'out'}", "--device=cpu"], "sample": ["--device=cpu"],
            "bench": ["--device=cpu", f"--out={tmp_path / 'bench.md'}"],
            "data.prepare": [f"--out_dir={tmp_path / 'data'}"]}[module]
    run = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    line = one_error_line(run.stderr)
    path = re.search(r"^error: unexpected ZeroDivisionError: division by zero; the full traceback is in (\S+\.txt) "
                     r"\(please include it in a bug report\)$", line).group(1)
    assert 'File "<string>", line 2' in Path(path).read_text()  # the traceback shows where it happened
    os.remove(path)


# -----------------------------------------------------------------------------
# 3. what a checkpoint holds goes through the checks of the flags; and every field, wrong, through the command line


WRONG = {int: ["x", "-1", "0"], float: ["x", "nan", "-1"], bool: ["maybe"], str: ["", "nonsense"]}  # CLI strings
DAMAGED = {int: ["x", None, -1], float: ["x", None, float("nan")], bool: ["x", None], str: [5, None]}  # in a file


@pytest.fixture(scope="module")
def good_run(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    train.main(**tiny_run(char_data, out, max_iters=2, eval_interval=2, eval_iters=1))
    return out


def test_every_setting_wrong_on_the_command_line_or_in_a_checkpoint_is_one_line(char_data, good_run, tmp_path):
    base = tiny_run(char_data, "OUT", max_iters=1, eval_interval=1, eval_iters=1)
    cases, names, must_refuse = [], [], []
    for config in (train.TrainConfig, MoDConfig):
        for field in fields(config):
            for value in WRONG[field.type]:  # through the command line, on a tiny scratch run
                case_dir = tmp_path / f"cli{len(cases)}"
                case_dir.mkdir()
                settings = {**base, "out_dir": str(case_dir / "out"), field.name: value}
                cases.append(dict(script=str(REPO / "train.py"), args=flags(settings), cwd=str(case_dir), env={},
                                  watch=[]))
                names.append(f"--{field.name}={value!r}")
                must_refuse.append(value == "x")  # no number; "", "0", "-1" are fine for a few fields
            for value in DAMAGED[field.type]:  # in the checkpoint a resume reads, and the one sample.py reads
                case_dir = tmp_path / f"ckpt{len(cases)}"
                shutil.copytree(good_run, case_dir)
                for name in ("ckpt.pt", "best.pt"):
                    ckpt = torch.load(case_dir / name, weights_only=True)
                    part = "train_config" if config is train.TrainConfig else "model_config"
                    ckpt[part][field.name] = value
                    torch.save(ckpt, case_dir / name)
                resume = {**base, "out_dir": str(case_dir), "init_from": "resume"}
                for script, args in (("train.py", flags(resume)), ("sample.py", [f"--out_dir={case_dir}",
                                                                                 "--device=cpu",
                                                                                 "--max_new_tokens=3"])):
                    cases.append(dict(script=str(REPO / script), args=args, cwd=str(case_dir), env={}, watch=[]))
                    names.append(f"{script}: {part}.{field.name}={value!r}")
                    # each value is wrong for its field; sample.py reads the model's settings only
                    must_refuse.append(script == "train.py" or part == "model_config")
    results = run_cases(cases, tmp_path)
    assert len(results) == len(names) > 300
    for name, result, refuse in zip(names, results, must_refuse):
        output = result["stdout"] + result["stderr"]
        assert "Traceback" not in output, (name, output[-2000:])
        assert result["status"] != 0 or not refuse, name
        if result["status"] != 0:  # refused in one line
            lines = result["stderr"].strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (name, result["stderr"])
        if result["status"] != 0 and name.startswith("train.py:"):  # a damaged checkpoint: the file is named
            assert "ckpt.pt" in result["stderr"], (name, result["stderr"])


def test_a_checkpoint_that_does_not_hold_together_names_the_file_and_the_field(good_run, tmp_path):
    for change, pattern in ((lambda c: c.update(iter_num="4"), r"ckpt.pt is damaged \(iter_num '4'"),
                            (lambda c: c.update(best_val_loss=None), r"ckpt.pt is damaged .*best_val_loss None"),
                            (lambda c: c["train_config"].update(beta1=2.0), r"ckpt.pt is damaged: its train_config "
                                                                            r"does not hold together \(beta1"),
                            (lambda c: c["meta"].update(vocab_size=3, chars="abc"), r"has a vocabulary of 3 tokens")):
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        shutil.copytree(good_run, tmp_path / "run")
        ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
        change(ckpt)
        torch.save(ckpt, tmp_path / "run" / "ckpt.pt")
        before = snapshot([tmp_path / "run"])
        run = subprocess.run([sys.executable, "train.py", "--device=cpu", "--init_from=resume",
                              f"--out_dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and re.search(pattern, one_error_line(run.stderr)), run.stderr
        assert snapshot([tmp_path / "run"]) == before


# -----------------------------------------------------------------------------
# 4. the data prepared again during a run: the run trains on what it checked, and saves that vocabulary


def test_data_prepared_again_mid_run_is_never_seen_by_the_run(char_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    meta = json.loads((data / "meta.json").read_text())
    proc = start_training(flags(tiny_run(str(data), tmp_path / "out", max_iters=300, lr_decay_iters=300,
                                         eval_interval=100, log_interval=10)))
    wait_for_line(proc, "iter 20:")
    other = tmp_path / "other.txt"  # another text, another vocabulary (another size), prepared over the run's data
    other.write_text("".join(VERSES).lower() * 30)
    prepare("shakespeare_char", str(other), str(data))
    assert json.loads((data / "meta.json").read_text())["vocab_size"] != meta["vocab_size"]
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in out, out
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 300 and ckpt["meta"] == meta  # trained to the end, on the vocabulary it checked


# -----------------------------------------------------------------------------
# 5. numeric edges: ranges checked where a value enters, nothing overflows


def test_extreme_numbers_are_refused_where_they_enter(good_run, tmp_path):
    for args, pattern in ((["--max_new_tokens=100000000000"], r"--max_new_tokens must be"),
                          ([f"--max_new_tokens={2**70}"], r"--max_new_tokens must be"),
                          ([f"--seed={2**70}"], r"--seed must be in"),
                          (["--num_samples=-3"], r"--num_samples .* must be >= 1")):
        run = subprocess.run([sys.executable, "sample.py", f"--out_dir={good_run}", "--device=cpu", *args], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and re.search(pattern, one_error_line(run.stderr)), (args, run.stderr)
    run = subprocess.run([sys.executable, "bench.py", "--out="], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1 and "--out is empty" in one_error_line(run.stderr)
    # the smallest temperatures sample as greedy decoding does, instead of dividing by zero
    import sample
    greedy = sample.main(out_dir=str(good_run), num_samples=1, max_new_tokens=8, temperature=0, device="cpu")
    for tiny_t in (1e-30, 5e-324):
        assert sample.main(out_dir=str(good_run), num_samples=1, max_new_tokens=8, temperature=tiny_t,
                           device="cpu")["samples"] == greedy["samples"]


# -----------------------------------------------------------------------------
# 6. a closed stdout is not a disk error: printing stops, the run saves and stops quietly (141, SIGPIPE's status)


def test_a_closed_stdout_stops_the_run_quietly_with_its_state_saved(char_data, tmp_path):
    proc = subprocess.Popen([sys.executable, "-u", "train.py", *flags(tiny_run(char_data, tmp_path, max_iters=100000,
                                                                               eval_interval=100000))],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_line(proc, "iter 3:")  # `python train.py | grep -m1 "iter 3:"`: the reader has what it wanted
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == "", err
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] >= 3


def test_sample_into_a_closed_pipe_exits_quietly(good_run):
    proc = subprocess.Popen([sys.executable, "-u", "sample.py", f"--out_dir={good_run}", "--device=cpu",
                             "--max_new_tokens=20"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # `python sample.py | head -0`
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == b"", err


# -----------------------------------------------------------------------------
# 8. many processes: every configuration trains under DDP, and a pre-flight refusal is every process's one line


@pytest.mark.parametrize("setting", ["router=random", "router_aux_loss=0.1"])
def test_ddp_two_processes_train_the_controls(char_data, tmp_path, setting):
    key, value = setting.split("=")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    cmd += flags(tiny_run(char_data, tmp_path, max_iters=3, gradient_accumulation_steps=2, eval_interval=3,
                          **{key: value}))
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 3: train loss" in run.stdout and (tmp_path / "ckpt.pt").exists()


def test_ddp_pre_flight_refusal_is_the_same_one_line_on_every_process(char_data, good_run, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--tee=2",
           "train.py", *flags(tiny_run(char_data, good_run, max_iters=3, gradient_accumulation_steps=2))]  # over a run
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    ours = [line.split("]:", 1)[1] for line in run.stderr.splitlines() if re.match(r"\[(default)?\d+\]:", line)]
    errors = [line for line in ours if line.startswith("error: ")]
    assert len(errors) == 2 and len(set(errors)) == 1 and "holds ckpt.pt and best.pt" in errors[0], run.stderr
    assert not any("Traceback" in line for line in ours), run.stderr[-3000:]


# -----------------------------------------------------------------------------
# 9. leftovers and surprises


def test_sigterm_while_preparing_data_leaves_no_temporary_file(tmp_path):
    text = tmp_path / "in.txt"
    text.write_text("".join(VERSES) * 40)
    slow = ("import sys, time, data.prepare as dp\n"
            "real = dp.write_atomically\n"
            "def slow(files, describe=None):\n"
            "    def slowly(write):\n"
            "        def w(tmp):\n"
            "            write(tmp); print('written', flush=True); time.sleep(60)\n"
            "        return w\n"
            "    return real({p: slowly(w) for p, w in files.items()}, describe)\n"
            "dp.write_atomically = slow\n"
            "dp.main('shakespeare_char', sys.argv[1:])\n")
    proc = subprocess.Popen([sys.executable, "-c", slow, f"--input={text}", f"--out_dir={tmp_path / 'data'}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"  # a temporary file is on disk now
    assert any(p.name.endswith(".tmp") for p in (tmp_path / "data").iterdir())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert list((tmp_path / "data").iterdir()) == []  # nothing half-written, nothing left behind


def test_a_resume_takes_the_machine_settings_of_this_run_not_the_checkpoints(good_run, char_data, tmp_path):
    shutil.copytree(good_run, tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    ckpt["train_config"].update(compile=True, peak_tflops=123.0)  # trained on another machine
    torch.save(ckpt, tmp_path / "run" / "ckpt.pt")
    train.main(**tiny_run(char_data, tmp_path / "run", init_from="resume", max_iters=4, eval_interval=2))
    resumed = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["train_config"]
    assert resumed["compile"] is False and resumed["peak_tflops"] == 0.0


def test_a_resume_on_other_data_never_prepares_it(good_run, tmp_path):
    repo = tmp_path / "repo"  # a copy of the code, so that its data/ folder is this test's
    for name in ("train.py", "mod.py", "plumbing.py", "data/__init__.py", "data/prepare.py"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(good_run, tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    ckpt["train_config"]["data_dir"] = ""  # trained on the default folder, data/shakespeare_char
    torch.save(ckpt, tmp_path / "run" / "ckpt.pt")
    run = subprocess.run([sys.executable, str(repo / "train.py"), "--device=cpu", "--init_from=resume",
                          f"--out_dir={tmp_path / 'run'}", "--dataset=shakespeare"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "holds no train.bin/val.bin/meta.json" in one_error_line(run.stderr)
    assert not (repo / "data" / "shakespeare").exists()  # not prepared (a download, minutes of BPE) just to refuse


def test_nothing_to_train_says_so(good_run, char_data, tmp_path, capsys):
    shutil.copytree(good_run, tmp_path / "run")
    train.main(**tiny_run(char_data, tmp_path / "run", init_from="resume", max_iters=2))
    assert "note: nothing to train: the run is at iteration 2 and --max_iters=2" in capsys.readouterr().out
    train.main(**tiny_run(char_data, tmp_path / "new", max_iters=0))
    assert "--max_iters=0" in capsys.readouterr().out


def test_a_failed_metrics_write_leaves_no_temporary_file(char_data, tmp_path, monkeypatch):
    import plumbing

    def disk_full(self, path):  # half the history written, then the disk is full
        with open(path, "w") as f:
            f.write('{"kind": "ev')
        raise OSError(28, "No space left on device", path)
    monkeypatch.setattr(plumbing.Metrics, "write_history", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train.main(**tiny_run(char_data, tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == []  # no metrics.jsonl.<pid>.<random>.tmp
