"""A small BigEarthNet-S2 v1.0 folder to try stages 1-2 on, in the real layout.

    python data/make_bigearthnet_sample.py --out data/bigearthnet_try
    python 01_patch_clip.py --model ViT-S-32 --pretrained none --data bigearthnet19 --root data/bigearthnet_try \\
        --epochs 1 --batch-size 16 --out runs/ben_try/patch

The real sample patches (--real, if present) are copied, and --per-split generated patches are added
to each official split (train, val, test), named from the official lists (data/bigearthnet/), so the
stages find a training and a validation split. A generated patch has the 12 L2A bands at their own
resolutions (uint16, 120/60/20 px a side) and a labels_metadata.json; its pixels are noise around a
brightness that depends on its first label, so there is something to learn. They are for checking
that the stages run, never for reporting accuracy.
"""
import argparse
import bz2
import json
import os
import shutil

import numpy as np
import tifffile

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = {"B01": 20, "B02": 120, "B03": 120, "B04": 120, "B05": 60, "B06": 60, "B07": 60, "B08": 120,
         "B8A": 60, "B09": 20, "B11": 60, "B12": 60}  # pixels a side of each L2A band
LABELS = (["Mixed forest"], ["Non-irrigated arable land", "Pastures"], ["Sea and ocean"],
          ["Discontinuous urban fabric"], ["Water bodies", "Peatbogs"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write (its BigEarthNet-v1.0/ holds the patches)")
    p.add_argument("--real", default=os.path.join(HERE, "..", "..", "shared", "data", "bigearthnet_s2_sample"),
                   help="real patches to copy in, if the folder exists (default: ../shared's sample)")
    p.add_argument("--per-split", type=int, default=20, help="generated patches per split (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated pixels (default: 0)")
    args = p.parse_args()
    root = os.path.join(args.out, "BigEarthNet-v1.0")
    os.makedirs(root, exist_ok=True)
    real = sorted(d for d in os.listdir(args.real) if os.path.isdir(os.path.join(args.real, d))) \
        if os.path.isdir(args.real) else []
    for name in real:
        shutil.copytree(os.path.join(args.real, name), os.path.join(root, name), dirs_exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for split in ("train", "val", "test"):
        with bz2.open(os.path.join(HERE, "bigearthnet", f"{split}.csv.bz2"), "rt") as f:
            names = [line.strip() for line in f if line.strip() and line.strip() not in real][:args.per_split]
        for k, name in enumerate(names):
            labels = LABELS[k % len(LABELS)]
            os.makedirs(os.path.join(root, name), exist_ok=True)
            for band, size in SIZES.items():
                level = 300 + 250 * (k % len(LABELS)) + 40 * list(SIZES).index(band)
                tifffile.imwrite(os.path.join(root, name, f"{name}_{band}.tif"),
                                 np.clip(rng.normal(level, 120, (size, size)), 0, 10000).astype(np.uint16))
            with open(os.path.join(root, name, f"{name}_labels_metadata.json"), "w") as f:
                json.dump({"labels": labels, "acquisition_date": "2017-06-13 10:10:31"}, f)
    print(f"wrote {root}: {len(real)} real patches and {3 * args.per_split} generated ones "
          f"({args.per_split} per official split); pass --root {args.out}")


if __name__ == "__main__":
    main()
