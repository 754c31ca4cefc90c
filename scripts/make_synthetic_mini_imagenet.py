"""Write synthetic mini-ImageNet files in the real pickle format, at full size.

    python scripts/make_synthetic_mini_imagenet.py /tmp/mini_synthetic
    metalearn train dataset=mini_imagenet dataset.manual_dir=/tmp/mini_synthetic trainer.steps=20

Three files, ``mini-imagenet-cache-{train,val,test}.pkl``, each a dict with ``image_data``
uint8 (classes * 600, 84, 84, 3) and ``class_dict`` {wnid: row indices}, for the 64 / 16 /
20 WordNet ids of the Ravi & Larochelle split (about 1.3 GB in all). The pixels are
random: this checks the data path, the episode shapes and the speed of a setup without
the real files, not accuracy (test accuracy stays at chance, 20% for 5-way).
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np

from metalearn.data import mini_imagenet as mi

FILE_NAMES = {"train": "train", "validation": "val", "test": "test"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    per_class = mi.IMAGES_PER_CLASS
    for split, wnids in mi.SPLIT_WNIDS.items():
        images = rng.integers(0, 256, size=(len(wnids) * per_class, 84, 84, 3), dtype=np.uint8)
        class_dict = {w: list(range(i * per_class, (i + 1) * per_class)) for i, w in enumerate(wnids)}
        path = args.folder / f"mini-imagenet-cache-{FILE_NAMES[split]}.pkl"
        with open(path, "wb") as f:
            pickle.dump({"image_data": images, "class_dict": class_dict}, f, protocol=4)
        print(f"{path}: {len(wnids)} classes x {per_class} images")


if __name__ == "__main__":
    main()
