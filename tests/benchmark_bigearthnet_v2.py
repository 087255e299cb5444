"""BigEarthNet v2.0 (reBEN): how fast the archive is listed and read (a script; pytest does not collect it).

    python tests/benchmark_bigearthnet_v2.py                     # the figures in docs/performance.md
    python tests/benchmark_bigearthnet_v2.py --rows 1000 --patches 20   # a quick check

Prints:
  (a) the time to list a generated metadata.parquet of --rows rows (549,488 by default: all the pairs of
      the release, an upper bound on its metadata.parquet, which leaves out the snow/cloud/shadow patches);
      listing opens no tif, so none are written for it;
  (b) for --patches generated patches in the release's layout (12 band tifs at their own sizes), the rate
      of the project's loader (C.open_images + C.batch_loader, one process) and of raw tifffile.imread of
      the same 12 tifs per patch, in patches per second, and their ratio, measured in the same run, each
      pass after a warm-up pass (the tifs in the page cache).
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tifffile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402

SIZES = {"B01": 20, "B02": 120, "B03": 120, "B04": 120, "B05": 60, "B06": 60, "B07": 60, "B08": 120,
         "B8A": 60, "B09": 20, "B11": 60, "B12": 60}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=549_488, help="rows of the listed metadata.parquet (default: "
                   "549,488, the release's pairs)")
    p.add_argument("--patches", type=int, default=500, help="patches read in (b) (default: 500)")
    p.add_argument("--batch-size", type=int, default=64, help="patches per batch of the loader (default: 64)")
    p.add_argument("--repeat", type=int, default=3, help="timed passes of each, the best kept (default: 3)")
    return p.parse_args()


def metadata(n, rng):
    """n rows as the release's metadata.parquet has them (1-5 of the 19 names each, its three splits)."""
    names = np.array(C.bigearthnet_nomenclature()["labels19"])
    where = [(k // 10_000, k % 10_000 // 100, k % 100) for k in range(n)]  # tile, row, column: unique
    ids = [f"S2A_MSIL2A_20170613T101031_N9999_R{t:03d}_T33UUP_{r}_{c}" for t, r, c in where]
    counts = rng.integers(1, 6, n)
    labels = [list(names[rng.choice(19, c, replace=False)]) for c in counts]
    return pa.table({
        "patch_id": ids, "labels": labels,
        "split": rng.choice(["train", "validation", "test"], n).tolist(), "country": ["Austria"] * n,
        "s1_name": [f"S1B_IW_GRDH_1SDV_20170612T{t:06d}_33UUP_{r}_{c}" for t, r, c in where],
        "s2v1_name": [f"S2A_MSIL2A_20170613T101031_{k}" for k in range(n)],
        "contains_seasonal_snow": [False] * n, "contains_cloud_or_shadow": [False] * n})


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    args = parse_args()
    rng = np.random.default_rng(0)
    work = tempfile.mkdtemp(prefix="reben-bench-")
    try:
        table = metadata(args.rows, rng)
        assert len(set(table["patch_id"].to_pylist())) == args.rows
        pq.write_table(table, os.path.join(work, "metadata.parquet"))
        listed = best(lambda: C.list_scenes("bigearthnet19_v2", work), args.repeat)
        print(f"(a) listing {args.rows:,} rows of metadata.parquet: {listed:.2f} s "
              f"(best of {args.repeat}; {os.path.getsize(os.path.join(work, 'metadata.parquet')) / 1e6:.1f} MB)")

        small = table.slice(0, args.patches)
        pq.write_table(small, os.path.join(work, "metadata.parquet"))
        folders = []
        for patch in small["patch_id"].to_pylist():
            folder = os.path.join(work, "BigEarthNet-S2", patch.rsplit("_", 2)[0], patch)
            os.makedirs(folder)
            for band, size in SIZES.items():
                tifffile.imwrite(os.path.join(folder, f"{patch}_{band}.tif"),
                                 rng.integers(0, 4000, (size, size)).astype(np.uint16))
            folders.append(folder)
        scenes = C.list_scenes("bigearthnet19_v2", work)

        def raw():
            for folder in folders:
                name = os.path.basename(folder)
                for band in SIZES:
                    tifffile.imread(os.path.join(folder, f"{name}_{band}.tif"))

        def loader():
            for _ in C.batch_loader(C.open_images(scenes), args.batch_size):
                pass

        raw(), loader()  # warm-up: the tifs in the page cache
        t_raw, t_loader = best(raw, args.repeat), best(loader, args.repeat)
        n = len(folders)
        print(f"(b) {n} patches, 12 tifs each: loader {n / t_loader:,.0f} patches/s, raw tifffile.imread "
              f"{n / t_raw:,.0f} patches/s, loader/raw {t_raw / t_loader:.2f} (best of {args.repeat}, one process)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
