"""A newcomer's first hour: the notebook's first cell finds the code wherever it was put (Colab included), and the
command sequences of README.md and docs/usage.md run in the order written, without one refusal."""

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent

# =============================================================================
# tutorial.ipynb's first cell: here, in a folder below, on Google Drive, in an uploaded zip, from REPO_URL, or one
# clear error. The cell runs in this process, in a temporary folder, with subprocess.run (git, pip) faked.

DRIVE = "/content/drive/MyDrive"  # where Colab mounts Google Drive


def first_cell():
    notebook = json.loads((REPO / "tutorial.ipynb").read_text())
    return "".join(next(cell for cell in notebook["cells"] if cell["cell_type"] == "code")["source"])


def make_project(folder):
    """A stand-in for the repository: the files the cell looks for and installs from."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("mod.py", "train.py", "requirements.txt"):
        (folder / name).write_text("")
    return folder


@pytest.fixture
def cell(monkeypatch, tmp_path):
    """run(folder, repo_url="", drive=None): runs cell 1 with folder as the working folder (and drive as Google
    Drive); returns (the working folder after it, the commands it ran). The cwd and sys.path are restored after."""
    source = first_cell()
    assert re.search(r'^REPO_URL = ""\s+#@param \{type:"string"\}$', source, re.M)  # a Colab form field
    assert DRIVE in source
    commands = []

    def fake_run(cmd, check=False, **kwargs):
        commands.append(list(cmd))
        if cmd[:2] == ["git", "clone"]:
            make_project(Path(cmd[-1]))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "path", list(sys.path))

    def run(folder, repo_url="", drive=None):
        monkeypatch.chdir(folder)  # monkeypatch restores the cwd at the end of the test
        code = source.replace('REPO_URL = ""', f"REPO_URL = {repo_url!r}")  # what Colab's form field does
        code = code.replace(DRIVE, str(drive or tmp_path / "no-drive"))
        exec(compile(code, "tutorial.ipynb, cell 1", "exec"), {"__name__": "__main__"})
        return Path.cwd(), commands

    return run


def installed(commands, folder):
    return [sys.executable, "-m", "pip", "install", "-q", "-r", "requirements.txt"] in commands and \
        Path.cwd() == folder.resolve()


def test_cell1_in_the_repository_does_nothing(cell):
    cwd, commands = cell(REPO)
    assert cwd == REPO and commands == []  # no clone, no pip: the code is here


@pytest.mark.parametrize("below", ["mod-main", "uploads/mod-main", "a/b/mod-main"])
def test_cell1_finds_the_code_in_a_folder_below(cell, tmp_path, below):
    project = make_project(tmp_path / "content" / below)
    make_project(tmp_path / "content" / "other")  # a folder without train.py beside mod.py is not the project
    (tmp_path / "content" / "other" / "train.py").unlink()
    cwd, commands = cell(tmp_path / "content")
    assert cwd == project.resolve() and installed(commands, project)
    assert not any(cmd[0] == "git" for cmd in commands)
    assert str(project.resolve()) in sys.path


def test_cell1_finds_the_code_on_google_drive(cell, tmp_path):
    (tmp_path / "content").mkdir()
    project = make_project(tmp_path / "drive" / "projects" / "mod-main")
    cwd, commands = cell(tmp_path / "content", drive=tmp_path / "drive")
    assert cwd == project.resolve() and installed(commands, project)


def test_cell1_unpacks_an_uploaded_zip_and_runs_again_without_unpacking(cell, tmp_path):
    content = tmp_path / "content"
    content.mkdir()
    with zipfile.ZipFile(content / "data.zip", "w") as z:  # another zip: not the project's, so not unpacked
        z.writestr("notes.txt", "")
    with zipfile.ZipFile(content / "mod.zip", "w") as z:  # a zip of a Drive folder: the code 3 folders down
        for name in ("mod.py", "train.py", "requirements.txt", "data/prepare.py"):
            z.writestr(f"MyDrive/projects/mod-main/{name}", "")
    cwd, commands = cell(content)
    project = content / "mod" / "MyDrive" / "projects" / "mod-main"  # 4 folders below content: found in the zip's
    assert cwd == project.resolve() and installed(commands, project)
    assert not (content / "data").exists()
    (project / "mod.py").write_text("# edited")
    cwd, _ = cell(content)  # the second run finds the unpacked folder: it does not unpack over the user's edits
    assert cwd == project.resolve() and (project / "mod.py").read_text() == "# edited"


def test_cell1_clones_REPO_URL_when_the_code_is_nowhere(cell, tmp_path):
    (tmp_path / "content").mkdir()
    cwd, commands = cell(tmp_path / "content", repo_url="https://example.org/mod.git")
    assert commands[0] == ["git", "clone", "-q", "https://example.org/mod.git", "mod-repo"]
    assert cwd == (tmp_path / "content" / "mod-repo").resolve() and installed(commands, cwd)


def test_cell1_without_code_or_REPO_URL_is_one_error_naming_the_three_ways(cell, tmp_path):
    (tmp_path / "content").mkdir()
    with pytest.raises(FileNotFoundError) as error:  # an ordinary exception: no SystemExit, no IPython warning
        cell(tmp_path / "content")
    message = str(error.value)
    for way in ("folder here", "Google Drive", "zip", "REPO_URL"):
        assert way in message, way
    assert Path.cwd() == (tmp_path / "content").resolve()


def test_no_cell_exits_the_kernel():
    notebook = json.loads((REPO / "tutorial.ipynb").read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert "sys.exit" not in "".join(cell["source"]) and "SystemExit" not in "".join(cell["source"])


def test_the_notebook_prose_quotes_no_results():
    """Every result is printed by a cell from its own run's numbers; the markdown says only what to look for. The
    only percentages in it: the capacity, and what a predictor that routes nothing would score as accuracy."""
    notebook = json.loads((REPO / "tutorial.ipynb").read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "markdown":
            assert set(re.findall(r"\d+(?:\.\d+)?%", "".join(cell["source"]))) <= {"12.5%", "87.5%"}


# =============================================================================
# README.md and docs/usage.md: every python train.py / sample.py line of their ```bash blocks, in the order written,
# each document in a fresh copy of the repository, at a tiny size


TINY_TRAIN = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8",
              "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--sample_tokens=0"]
TINY_SAMPLE = ["--max_new_tokens=5", "--device=cpu"]
SKIPPED = [  # (a part of the command, why this test does not run it)
    ("pip install", "installs from the network; the test runs where the requirements are installed"),
    ("python -m pytest", "the tests themselves"),
    ("torchrun", "DDP with 2 processes takes long; test_scripts.py runs DDP"),
    ("bench.py --quality", "about 20 minutes of training"),
    ("bench.py --figures", "minutes of training; test_scripts.py runs bench.figures() at a tiny size"),
    ("experiments/", "minutes to half an hour of training; test_experiments.py runs each experiment at a tiny size"),
    ("--device=cuda", "needs a CUDA GPU"),
    ("--compile=True", "the GPU block: compiling takes minutes on a CPU; test_scripts.py compiles a tiny model"),
]


def command_lines(doc):
    """The commands of doc's ```bash blocks, in order: [(block number, [argv, ...]), ...], comments dropped and
    `a && b` split into its commands."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (REPO / doc).read_text(), re.S | re.M)
    assert blocks, f"no ```bash block in {doc}"
    return [(n, [shlex.split(part, comments=True) for line in block.splitlines() if line.strip()
                 for part in line.split(" && ")]) for n, block in enumerate(blocks)]


def plan(doc):
    """What the test does with each command of doc, in order: [(argv to run or None, the command, why skipped)]."""
    steps, ran = [], []
    for _, commands in command_lines(doc):
        for argv in commands:
            text = " ".join(argv)
            why = next((why for part, why in SKIPPED if part in text), None)
            if why is None and argv in ran:  # the README's quick start already ran it, and says to go on after it
                why = "ran already, above: running it again into the same folder is refused by design"
            if why is not None:
                steps.append((None, text, why))
                continue
            assert argv[0] == "python" and argv[1] in ("train.py", "sample.py"), f"{doc}: what is {text!r}?"
            ran.append(argv)
            extra = [] if "--help" in argv else TINY_TRAIN if argv[1] == "train.py" else TINY_SAMPLE
            steps.append(([sys.executable] + argv[1:] + extra, text, None))
    return steps


@pytest.fixture(scope="module")
def prepared_copy(tmp_path_factory):
    """The repository's python files and data scripts in a folder, with both datasets prepared once (from
    $SHAKESPEARE_TXT when set, so offline)."""
    root = tmp_path_factory.mktemp("prepared")
    for path in REPO.glob("*.py"):
        shutil.copy(path, root)
    shutil.copy(REPO / "requirements.txt", root)
    for path in (REPO / "data").rglob("*.py"):
        (root / path.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / path.relative_to(REPO))
    for dataset in ("shakespeare_char", "shakespeare"):
        subprocess.run([sys.executable, f"data/{dataset}/prepare.py"], cwd=root, check=True, capture_output=True,
                       timeout=120)
    return root


@pytest.mark.parametrize("doc", ["README.md", "docs/usage.md"])
def test_the_documented_command_sequence_runs_in_the_order_written(doc, prepared_copy, tmp_path):
    copy = tmp_path / "clone"
    shutil.copytree(prepared_copy, copy)
    steps = plan(doc)
    assert any(argv and argv[1] == "sample.py" for argv, _, _ in steps)  # the test reaches the sampling lines
    for argv, text, why in steps:
        if argv is None:
            print(f"skipped: {text}  ({why})")
            continue
        start = time.perf_counter()
        run = subprocess.run(argv, cwd=copy, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, f"{doc}: `{text}` exited {run.returncode}:\n{run.stdout[-2000:]}{run.stderr}"
        print(f"ran in {time.perf_counter() - start:.1f} s: {text}")
