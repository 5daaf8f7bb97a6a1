"""Write WordLlama's token embeddings as word vectors for `threatlake model build --pretrained`.

One vector per word of the ATT&CK bundle's technique text (and of any --text JSON-lines file's
"text"): the mean of the word's WordLlama tokens, in word2vec/GloVe text format. Needs
`pip install wordllama` (MIT; its wheel ships the l2_supercat weights and tokenizer). README,
"Mapping scores", has what these vectors did to the ranking.

    python3 notebooks/wordllama_vectors.py ../shared/data/attack/enterprise-attack.json.gz wl256.txt
    threatlake model build --domain enterprise --pretrained wl256.txt
"""

import argparse
import gzip
import json
import os
import re

import numpy as np
import wordllama
from safetensors.numpy import load_file
from tokenizers import Tokenizer


def words_of(texts):
    out = set()
    for t in texts:
        for rx in (r"[A-Za-z0-9_]+", r"[A-Za-z0-9_.\-]+", r"\S+"):
            out.update(w.lower() for w in re.findall(rx, t))
    return sorted(w for w in out if len(w) < 40)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", help="ATT&CK STIX bundle (.json or .json.gz)")
    ap.add_argument("out", help="word vectors to write (text)")
    ap.add_argument("--text", action="append", default=[], help="JSON lines with a text field")
    a = ap.parse_args()
    home = os.path.dirname(wordllama.__file__)
    weights = load_file(os.path.join(home, "weights", "l2_supercat_256.safetensors"))
    table = weights["embedding.weight"].astype(np.float32)
    tok = Tokenizer.from_file(os.path.join(home, "tokenizers", "l2_supercat_tokenizer_config.json"))
    opener = gzip.open if a.bundle.endswith(".gz") else open
    with opener(a.bundle, "rt", encoding="utf-8") as f:
        objects = json.load(f)["objects"]
    texts = [
        o[k]
        for o in objects
        for k in ("name", "description", "x_mitre_detection")
        if isinstance(o.get(k), str)
    ]
    for path in a.text:
        with open(path, encoding="utf-8") as f:
            texts.extend(json.loads(line)["text"] for line in f if line.strip())
    n = 0
    with open(a.out, "w", encoding="utf-8") as out:
        for w in words_of(texts):
            ids = tok.encode(w, add_special_tokens=False).ids
            if ids:
                v = table[ids].mean(0)
                out.write(w + " " + " ".join(f"{x:.4f}" for x in v) + "\n")
                n += 1
    print(f"{n} words x {table.shape[1]} dims -> {a.out}")


if __name__ == "__main__":
    main()
