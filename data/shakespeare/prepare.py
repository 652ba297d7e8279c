"""
Prepare tiny-shakespeare with GPT-2's byte-pair encoding (tiktoken's r50k_base, 50257 tokens).
Writes train.bin and val.bin (the first 90% and last 10% of the text as uint16 token ids) and meta.json into
data/shakespeare/ (or --out_dir DIR). Works from any folder:

    python data/shakespeare/prepare.py [--input PATH] [--out_dir DIR]

The logic lives in data/prepare.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root
from data.prepare import main  # noqa: E402

if __name__ == "__main__":
    main("shakespeare")
