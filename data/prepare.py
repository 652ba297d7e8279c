"""
Prepare tiny-shakespeare for training, as nanoGPT's data/shakespeare*/prepare.py do, for two tokenizers:

  shakespeare_char   one token per character (65 of them)
  shakespeare        GPT-2's byte-pair encoding (tiktoken's r50k_base, 50257 tokens)

Both write into data/<dataset>/ (replacing what is there; train.py prepares only a folder that holds none of them):
  train.bin, val.bin   the first 90% and the last 10% of the text, as token ids in uint16 (raw numpy, no header)
  meta.json            how to turn ids back into text (read it with load_meta, use it with Tokenizer); written last,
                       so a folder with a meta.json holds a complete dataset
The text is checked (readable UTF-8, long enough) before anything is written.

Run one of:
  python data/shakespeare_char/prepare.py [--input PATH] [--out_dir DIR]
  python data/shakespeare/prepare.py      [--input PATH] [--out_dir DIR]
"""

import json
import os
import shutil
import urllib.request
from http.client import HTTPException

import numpy as np

from plumbing import ArgumentParser, ConfigError, DataError, is_int, run_cli, write_atomically

DATASETS = ("shakespeare_char", "shakespeare")
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
HERE = os.path.dirname(os.path.abspath(__file__))  # data/, which holds a folder per dataset
CACHE_PATH = os.path.join(HERE, "tinyshakespeare.txt")  # the downloaded copy (module-level so tests can move it)
ENCODING = "r50k_base"  # tiktoken's name for GPT-2's BPE


def dataset_dir(dataset):
    """A dataset's default folder, data/<dataset>."""
    return os.path.join(HERE, dataset)


# -----------------------------------------------------------------------------
# the text


def _offline_error(reason):
    return DataError(f"could not download tinyshakespeare ({reason}): pass --input PATH (or set SHAKESPEARE_TXT=PATH) "
                     f"to a local copy of tinyshakespeare, or connect to the internet to download it from {URL}")


def _download(path):
    """Download URL into path, all or nothing."""
    print(f"downloading {URL} to {path}")

    def fetch(tmp):
        with urllib.request.urlopen(URL, timeout=30) as response, open(tmp, "wb") as f:
            expected = response.headers.get("Content-Length")
            shutil.copyfileobj(response, f)
            size = f.tell()
        if size == 0 or (expected is not None and size != int(expected)):  # a connection that closed early
            raise _offline_error(f"got {size:,} bytes, expected {expected or 'more than 0'}")

    try:
        write_atomically({path: fetch})
    except (OSError, HTTPException) as e:  # no network, timeout (URLError and TimeoutError are OSErrors), cut off
        raise _offline_error(getattr(e, "reason", None) or e) from e


def text_path(input_path=None):
    """The file the corpus comes from, in this order: input_path, $SHAKESPEARE_TXT, the cached download CACHE_PATH,
    or a fresh download from URL (saved to CACHE_PATH)."""
    path = input_path or os.environ.get("SHAKESPEARE_TXT")
    if path:
        if not os.path.isfile(path):
            source = "--input" if input_path else "SHAKESPEARE_TXT"
            raise DataError(f"{source} names {path!r}, which is not a file: give the path of a copy of tinyshakespeare")
        return path
    if not os.path.exists(CACHE_PATH):
        _download(CACHE_PATH)
    return CACHE_PATH


def read_text(input_path=None):
    """The whole corpus as a string, from text_path(input_path)."""
    path = text_path(input_path)
    try:
        with open(path, encoding="utf-8") as f:  # text mode, like nanoGPT: Windows line ends become "\n"
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {e.start}): give a plain-text copy of "
                        "tinyshakespeare") from e
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}): give a readable copy of tinyshakespeare") from e
    if not text:
        raise DataError(f"{path} is empty: replace it with a copy of tinyshakespeare, or pass --input PATH to one")
    return text


def prepare_command(data_dir, dataset=None):
    """The command that prepares data_dir (again), for error messages."""
    dataset = dataset or os.path.basename(os.path.normpath(data_dir))
    script = f"python data/{dataset if dataset in DATASETS else '<dataset>'}/prepare.py"
    if dataset in DATASETS and os.path.abspath(data_dir) == dataset_dir(dataset):
        return script  # its default folder
    return f"{script} --out_dir={data_dir}"


def meta_problem(meta):
    """What is wrong with a meta dict, in a few words, or None: every key that Tokenizer and train.py rely on."""
    if not isinstance(meta, dict) or meta.get("tokenizer") not in ("char", "tiktoken"):
        return "is not a meta.json written by data/prepare.py"
    vocab_size = meta.get("vocab_size")
    if not is_int(vocab_size) or not 1 <= vocab_size <= 2**16:
        return f"has no valid vocab_size (an integer from 1 to 65536), got {vocab_size!r}"
    if meta["tokenizer"] == "char" and (not isinstance(meta.get("chars"), str) or len(meta["chars"]) != vocab_size):
        return "lacks its vocabulary (chars: one character per token)"
    if meta["tokenizer"] == "tiktoken" and not isinstance(meta.get("encoding"), str):
        return "lacks the name of its tiktoken encoding"
    return None


def load_meta(data_dir, dataset=None):
    """The meta.json that prepare wrote into data_dir, as a dict, checked. dataset: for the error messages."""
    path = os.path.join(data_dir, "meta.json")
    run = prepare_command(data_dir, dataset)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path} not found: run {run} first") from None
    except ValueError as e:  # bad JSON or bad UTF-8
        raise DataError(f"{path} is not valid JSON ({e}): run {run} again") from None
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}): check its permissions, or run {run} again") from None
    problem = meta_problem(meta)
    if problem:
        raise DataError(f"{path} {problem}: run {run} again")
    return meta


def check_token_files(data_dir, meta, block_size):
    """Check train.bin and val.bin once, when training loads them, so that the training step need not: each must be
    whole uint16 token ids (an even number of bytes), hold more than block_size tokens, and only ids that meta.json's
    vocabulary has. Reads each file once (about a second per 500 MB)."""
    run = prepare_command(data_dir, meta.get("dataset"))
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        size = os.path.getsize(path)
        if size % 2:
            raise DataError(f"{path} has an odd number of bytes ({size:,}), so it is not uint16 token ids: "
                            f"prepare the data again with {run}")
        if size // 2 <= block_size:
            raise DataError(f"{path} holds {size // 2:,} tokens, too few for block_size {block_size}: use a smaller "
                            f"--block_size, or prepare it again from a longer text: {run} --input=PATH")
        top = int(np.memmap(path, dtype=np.uint16, mode="r").max())
        if top >= meta["vocab_size"]:
            raise DataError(f"{path} holds token id {top}, but the vocabulary in meta.json has {meta['vocab_size']} "
                            f"tokens: the files do not belong together; prepare the data again with {run}")


# -----------------------------------------------------------------------------
# tokenizers


def _get_encoding(name):
    """tiktoken's encoding, downloaded once into tiktoken's cache (TIKTOKEN_CACHE_DIR, if set)."""
    try:
        import tiktoken
        return tiktoken.get_encoding(name)
    except ImportError:
        raise DataError("the BPE dataset needs tiktoken: pip install tiktoken") from None
    except Exception as e:  # offline with an empty cache: the error comes from deep inside requests
        raise DataError(f"tiktoken could not load its {name!r} encoding ({type(e).__name__}): go online once, or set "
                        "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cache of it") from e


class Tokenizer:
    """Text <-> token ids, built from a meta dict: Tokenizer(load_meta("data/shakespeare_char"))."""

    def __init__(self, meta):
        self.meta = meta
        self.vocab_size = meta["vocab_size"]
        if meta["tokenizer"] == "char":
            self.enc = None
            self.chars = meta["chars"]  # id i is the character chars[i]
            self.stoi = {c: i for i, c in enumerate(self.chars)}
            self.newline_or_eot = self.stoi.get("\n", 0)  # starts generation from an empty prompt
        elif meta["tokenizer"] == "tiktoken":
            self.enc = _get_encoding(meta["encoding"])
            self.newline_or_eot = self.enc.eot_token  # <|endoftext|>
        else:
            raise DataError(f"unknown tokenizer {meta['tokenizer']!r} in meta.json: "
                            "run python data/<dataset>/prepare.py again")

    def encode(self, text):
        """A prompt's ids. BPE: a literal <|endoftext|> in it is the special token."""
        if self.enc is not None:
            return self.enc.encode(text, allowed_special={"<|endoftext|>"})
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            trained_on = f"{self.meta.get('dataset', 'the data')}'s {self.vocab_size} characters"
            raise ValueError(f"characters not in the vocabulary: {', '.join(map(repr, unknown))}; "
                             f"the model was trained on {trained_on}; remove or replace them")
        return [self.stoi[c] for c in text]

    def encode_ordinary(self, text):
        """The corpus's ids: special tokens spelled out in the text stay plain text (tiktoken's encode_ordinary)."""
        return self.enc.encode_ordinary(text) if self.enc is not None else self.encode(text)

    def decode(self, ids):
        ids = [int(i) for i in ids]  # also takes numpy arrays and tensors
        return self.enc.decode(ids) if self.enc is not None else "".join(self.chars[i] for i in ids)


def _make_meta(dataset, text):
    """The vocabulary: all characters of the text, or GPT-2's BPE."""
    if dataset == "shakespeare_char":
        chars = "".join(sorted(set(text)))
        return {"dataset": dataset, "tokenizer": "char", "vocab_size": len(chars), "chars": chars}
    enc = _get_encoding(ENCODING)
    return {"dataset": dataset, "tokenizer": "tiktoken", "encoding": ENCODING,
            "vocab_size": enc.n_vocab, "eot_token": enc.eot_token}


# -----------------------------------------------------------------------------
# prepare


def prepare(dataset, input_path=None, out_dir=None, min_tokens=1):
    """Tokenize tiny-shakespeare and write train.bin, val.bin and meta.json into out_dir (default data/<dataset>/).
    Each part must hold more than min_tokens tokens (train.py passes its block_size). Everything is checked before
    anything is written, so a bad text never replaces good files. Returns the meta dict."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    out_dir = out_dir or dataset_dir(dataset)
    path = text_path(input_path)
    text = read_text(path)
    meta = _make_meta(dataset, text)
    if meta["vocab_size"] > 2**16:
        raise DataError(f"the text has {meta['vocab_size']:,} distinct characters, too many for uint16 ids: "
                        "give a copy of tinyshakespeare")
    tokenizer = Tokenizer(meta)

    # split by characters, the first 90% for training, then tokenize each part (as nanoGPT)
    n = int(len(text) * 0.9)
    train_ids = np.array(tokenizer.encode_ordinary(text[:n]), dtype=np.uint16)
    val_ids = np.array(tokenizer.encode_ordinary(text[n:]), dtype=np.uint16)
    for split, ids in (("training", train_ids), ("validation", val_ids)):
        if len(ids) <= min_tokens:
            raise DataError(f"{path} ({len(text):,} characters) gives {len(ids):,} {split} tokens, too few (more "
                            f"than {min_tokens} needed): give a longer text, such as tinyshakespeare (1.1 million "
                            "characters), with --input PATH or SHAKESPEARE_TXT=PATH; nothing was written")

    _write_dataset(out_dir, train_ids, val_ids, meta)
    print(f"length of dataset in characters: {len(text):,}")
    print(f"vocab size: {meta['vocab_size']:,} ({meta['tokenizer']})")
    print(f"train has {len(train_ids):,} tokens")
    print(f"val has {len(val_ids):,} tokens")
    print(f"wrote train.bin, val.bin and meta.json to {out_dir}")
    return meta


def _write_dataset(out_dir, train_ids, val_ids, meta):
    """Write train.bin, val.bin and meta.json into out_dir, all or nothing as far as a filesystem allows
    (plumbing.write_atomically): a full disk fails before anything is replaced, and meta.json is renamed into place
    last, its old copy removed first. So a folder with a meta.json holds a complete dataset; train.py calls anything
    else partial and says how to prepare it again."""
    files = {"train.bin": train_ids.tobytes(), "val.bin": val_ids.tobytes(),
             "meta.json": json.dumps(meta, indent=1).encode()}

    def writer(data):
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data)
        return write
    try:
        os.makedirs(out_dir, exist_ok=True)
        write_atomically({os.path.join(out_dir, name): writer(data) for name, data in files.items()})
    except OSError as e:
        raise DataError(f"cannot write to {out_dir} ({e.strerror}): pass --out_dir DIR to a writable folder") from e


# -----------------------------------------------------------------------------
# what train.py uses: the dataset, prepared on first use and checked once


def prepare_if_missing(dataset, data_dir, min_tokens, may_prepare=True):
    """Prepare data_dir when it holds none of train.bin, val.bin and meta.json: the default folder data/<dataset>
    on first use. A folder that holds only some of them is an error (never prepared over: they may come from the
    user's own text), and so is an empty folder that may not be prepared (one the user named with --data_dir, or
    any when resuming: a resumed run trains on the data it was trained on, which exists)."""
    names = ("train.bin", "val.bin", "meta.json")
    present = [name for name in names if os.path.exists(os.path.join(data_dir, name))]
    run = prepare_command(data_dir, dataset)
    if not present and not may_prepare:
        raise ConfigError(f"{data_dir} holds no train.bin/val.bin/meta.json: prepare it with {run} (add "
                          f"--input=PATH for your own text), or name the data to use with --data_dir")
    if not present:
        print(f"preparing {dataset} in {data_dir} ...")
        prepare(dataset, out_dir=data_dir, min_tokens=min_tokens)  # checks the text before writing
    elif len(present) < len(names):
        missing = [name for name in names if name not in present]
        raise DataError(f"{data_dir} holds {' and '.join(present)} but no {' or '.join(missing)}: a partial "
                        f"dataset, which train.py will not prepare over; prepare it again with {run} (it "
                        f"rewrites all three files; --input=PATH for your own text)")


def load_dataset(data_dir, dataset, block_size):
    """The meta dict of a prepared dataset, with its token files checked (check_token_files)."""
    meta = load_meta(data_dir, dataset)
    check_token_files(data_dir, meta, block_size)
    return meta


def check_same_vocabulary(vocab_size, trained_meta, meta, data_dir, trained_on):
    """A resumed model (of vocab_size tokens, trained on the data of trained_meta) trains on the vocabulary it was
    trained with: the same size is not enough (65 other characters are another vocabulary)."""
    if vocab_size != meta["vocab_size"]:
        raise ConfigError(f"the checkpoint's vocabulary has {vocab_size} tokens but {data_dir} has "
                          f"{meta['vocab_size']}: resume with the dataset it was trained on")
    vocabulary = [m.get("chars") if m["tokenizer"] == "char" else m.get("encoding") for m in (trained_meta, meta)]
    if vocabulary[0] != vocabulary[1]:
        raise ConfigError(f"the checkpoint's vocabulary is not the one of {data_dir} (both have {meta['vocab_size']} "
                          f"tokens, but different ones): resume with the data it was trained on ({trained_on})")


# -----------------------------------------------------------------------------
# the command line of data/<dataset>/prepare.py


def main(dataset, argv=None):
    """Command line of data/<dataset>/prepare.py: exit status 0 when done, 1 with one line on stderr when not."""
    what = f"Write tiny-shakespeare's train.bin, val.bin and meta.json for {dataset} (replacing any already there)."
    parser = ArgumentParser(prog=f"data/{dataset}/prepare.py", description=what)
    parser.add_argument("--input", metavar="PATH", help="a local copy of tinyshakespeare (default: $SHAKESPEARE_TXT, "
                        f"else data/tinyshakespeare.txt, downloaded once from {URL})")
    parser.add_argument("--out_dir", metavar="DIR", help=f"where to write (default: data/{dataset}/)")

    def run():
        args = parser.parse_args(argv)
        prepare(dataset, args.input, args.out_dir)
    # Ctrl-C leaves no half-written file behind (see _write_dataset)
    run_cli(run, on_interrupt="interrupted: run it again to prepare the data")
