"""
Prepare tiny-shakespeare for training, as nanoGPT's data/shakespeare*/prepare.py do, for two tokenizers:

  shakespeare_char   one token per character (65 of them)
  shakespeare        GPT-2's byte-pair encoding (tiktoken's r50k_base, 50257 tokens)

Both write into data/<dataset>/:
  train.bin, val.bin   the first 90% and the last 10% of the text, as token ids in uint16 (raw numpy, no header)
  meta.json            how to turn ids back into text (read it with load_meta, use it with Tokenizer)

Run one of:
  python data/shakespeare_char/prepare.py [--input PATH] [--out_dir DIR]
  python data/shakespeare/prepare.py      [--input PATH] [--out_dir DIR]
"""

import argparse
import json
import os
import shutil
import sys
import urllib.request
from http.client import HTTPException

import numpy as np

DATASETS = ("shakespeare_char", "shakespeare")
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
HERE = os.path.dirname(os.path.abspath(__file__))
CACHE_PATH = os.path.join(HERE, "tinyshakespeare.txt")  # the downloaded copy (module-level so tests can move it)
ENCODING = "r50k_base"  # tiktoken's name for GPT-2's BPE


class DataError(RuntimeError):
    """Bad or missing input data; the message is one sentence saying what to do."""


# -----------------------------------------------------------------------------
# files


def _write_atomic(path, write):
    """Call write(f) on a temporary file next to path, then rename it into place.
    The rename is atomic, so path is either the complete new file or untouched: never half-written."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # write or rename failed (or Ctrl-C): leave nothing behind
            os.remove(tmp)


def _offline_error(reason):
    return DataError(f"could not download tinyshakespeare ({reason}): pass --input PATH (or set SHAKESPEARE_TXT=PATH) "
                     f"to a local copy of tinyshakespeare, or connect to the internet to download it from {URL}")


def _download(path):
    """Download URL into path, all or nothing."""
    print(f"downloading {URL} to {path}")

    def fetch(f):
        with urllib.request.urlopen(URL, timeout=30) as response:
            expected = response.headers.get("Content-Length")
            shutil.copyfileobj(response, f)
        size = f.tell()
        if size == 0 or (expected is not None and size != int(expected)):  # a connection that closed early
            raise _offline_error(f"got {size:,} bytes, expected {expected or 'more than 0'}")

    try:
        _write_atomic(path, fetch)
    except (OSError, HTTPException) as e:  # no network, timeout (URLError and TimeoutError are OSErrors), cut off
        raise _offline_error(getattr(e, "reason", None) or e) from e


def read_text(input_path=None):
    """The whole corpus as a string. It comes from, in this order: input_path, $SHAKESPEARE_TXT,
    the cached download CACHE_PATH, or a fresh download from URL (saved to CACHE_PATH)."""
    path = input_path or os.environ.get("SHAKESPEARE_TXT")
    if path:
        if not os.path.isfile(path):
            source = "--input" if input_path else "SHAKESPEARE_TXT"
            raise DataError(f"{source} names {path!r}, which is not a file: give the path of a copy of tinyshakespeare")
    else:
        path = CACHE_PATH
        if not os.path.exists(path):
            _download(path)
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


def load_meta(data_dir):
    """The meta.json that prepare wrote into data_dir, as a dict."""
    path = os.path.join(data_dir, "meta.json")
    name = os.path.basename(os.path.normpath(data_dir))
    run = f"python data/{name if name in DATASETS else '<dataset>'}/prepare.py"
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path} not found: run {run} first") from None
    except ValueError as e:  # bad JSON or bad UTF-8
        raise DataError(f"{path} is not valid JSON ({e}): run {run} again") from None
    if not isinstance(meta, dict) or "tokenizer" not in meta:
        raise DataError(f"{path} is not a meta.json written by data/prepare.py: run {run} again")
    return meta


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
            trained_on = f"{self.meta['dataset']}'s {self.vocab_size} characters"
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


def prepare(dataset, input_path=None, out_dir=None):
    """Tokenize tiny-shakespeare and write train.bin, val.bin and meta.json into out_dir (default data/<dataset>/).
    Returns the meta dict."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    out_dir = out_dir or os.path.join(HERE, dataset)
    text = read_text(input_path)
    meta = _make_meta(dataset, text)
    if meta["vocab_size"] > 2**16:
        raise DataError(f"the text has {meta['vocab_size']:,} distinct characters, too many for uint16 ids: "
                        "give a copy of tinyshakespeare")
    tokenizer = Tokenizer(meta)

    # split by characters, the first 90% for training, then tokenize each part (as nanoGPT)
    n = int(len(text) * 0.9)
    train_ids = np.array(tokenizer.encode_ordinary(text[:n]), dtype=np.uint16)
    val_ids = np.array(tokenizer.encode_ordinary(text[n:]), dtype=np.uint16)

    try:
        os.makedirs(out_dir, exist_ok=True)
        _write_atomic(os.path.join(out_dir, "train.bin"), train_ids.tofile)
        _write_atomic(os.path.join(out_dir, "val.bin"), val_ids.tofile)
        _write_atomic(os.path.join(out_dir, "meta.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    except OSError as e:
        raise DataError(f"cannot write to {out_dir} ({e.strerror}): pass --out_dir DIR to a writable folder") from e

    print(f"length of dataset in characters: {len(text):,}")
    print(f"vocab size: {meta['vocab_size']:,} ({meta['tokenizer']})")
    print(f"train has {len(train_ids):,} tokens")
    print(f"val has {len(val_ids):,} tokens")
    print(f"wrote train.bin, val.bin and meta.json to {out_dir}")
    return meta


def main(dataset, argv=None):
    """Command line of data/<dataset>/prepare.py."""
    what = f"Write tiny-shakespeare's train.bin, val.bin and meta.json for {dataset}."
    parser = argparse.ArgumentParser(description=what)
    parser.add_argument("--input", metavar="PATH", help="a local copy of tinyshakespeare (default: $SHAKESPEARE_TXT, "
                        f"else data/tinyshakespeare.txt, downloaded once from {URL})")
    parser.add_argument("--out_dir", metavar="DIR", help=f"where to write (default: data/{dataset}/)")
    args = parser.parse_args(argv)
    try:
        prepare(dataset, args.input, args.out_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)  # one line, no traceback
        sys.exit(1)
