"""Write the original Omniglot PNGs of one split's characters as an image folder.

    python scripts/omniglot_png_folder.py --manual-dir DIR --out OUT [--variant small]
        [--split test] [--split-seed 0] [--polarity original|training] [--support-query K]

The characters are those that `metalearn train dataset=omniglot dataset.variant=V
dataset.split_seed=S` puts in the split (metalearn.data.omniglot.split_characters on the
de-duplicated archive keys; rotations are not written). ``original`` copies the PNG files as
they are in the zips (black strokes on white, 105x105, as users have them); ``training``
writes the same images inverted (white strokes on black, the training data's polarity).

``--support-query K``: instead of one folder per character, write OUT/support/<char>/ (the
first K drawings, by drawer) and OUT/query/<char>/ (the others), for `metalearn predict`.
Folder names are ``<alphabet>_<characterNN>``.
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from metalearn.data.omniglot import split_characters
from metalearn.data.omniglot_tfds import _MEMBER_RE, check_variant


def character_members(manual_dir: Path, variant: str) -> dict[str, tuple[Path, list[tuple[int, str]]]]:
    """``{"<alphabet>/<characterNN>": (zip, [(drawer, member), ...])}``, first archive wins."""
    found: dict[str, tuple[Path, list[tuple[int, str]]]] = {}
    for name in check_variant(variant):
        path = manual_dir / name
        members: dict[str, list[tuple[int, str]]] = {}
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                match = _MEMBER_RE.match(member)
                if match is None or "__MACOSX" in member:
                    continue
                members.setdefault(f"{match['alphabet']}/{match['character']}", []).append(
                    (int(match["drawer"]), member)
                )
        for key, drawings in members.items():
            found.setdefault(key, (path, sorted(drawings)))
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manual-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", default="small")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"))
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--polarity", default="original", choices=("original", "training"))
    parser.add_argument("--support-query", type=int, default=0, metavar="K")
    args = parser.parse_args(argv)

    members = character_members(args.manual_dir, args.variant)
    keys = split_characters(members, args.variant, args.split_seed)[args.split]
    n_files = 0
    for key in keys:
        path, drawings = members[key]
        folder = key.replace("/", "_")
        with zipfile.ZipFile(path) as zf:
            for i, (_, member) in enumerate(drawings):
                if args.support_query:
                    part = "support" if i < args.support_query else "query"
                    target = args.out / part / folder / Path(member).name
                else:
                    target = args.out / folder / Path(member).name
                target.parent.mkdir(parents=True, exist_ok=True)
                data = zf.read(member)
                if args.polarity == "training":
                    with Image.open(io.BytesIO(data)) as img:
                        grey = np.asarray(img.convert("L"))
                    Image.fromarray(255 - grey).save(target)
                else:
                    target.write_bytes(data)
                n_files += 1
    print(f"wrote {n_files} {args.polarity} PNGs of {len(keys)} {args.split} characters to {args.out}")


if __name__ == "__main__":
    main()
