"""Feature loading: our memory-mapped store vs the official "whole TSV in RAM" loader.

Generates (or reuses) an obj36 TSV of random features, converts it into a store, then measures each
side in its own subprocess pinned to one core (so peaks are separate):

* store: time and RSS growth to open (+ the first id lookup); random-batch throughput
  (``get_row`` of ``--batch`` random rows, as the task readers do, all fields, float32 out), first with the store's pages
  evicted from the page cache (``posix_fadvise(DONTNEED)`` on our own files only), then warm
  (the same batches again);
* official: ``load_obj_tsv`` as in ``airsplay/lxmert src/utils.py`` (csv.DictReader, base64 ->
  numpy, a list of dicts) - time and RSS growth; then the same random batches from that list.

RSS comes from /proc/self/status (VmRSS / VmHWM, peak reset through /proc/self/clear_refs).

    python benchmarks/feature_loading.py                      # 20k images x 2048-d (~8 GB TSV)
    python benchmarks/feature_loading.py --images 2000 --feature-dim 256 --dir /tmp/fl
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGETS = {"open_s": 1.0, "open_rss_mb": 100.0, "images_per_s": 5000.0}
FIELDNAMES = ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
              "num_boxes", "boxes", "features"]


# ---------------------------------------------------------------------------------------------
# Measuring helpers (used in the children)


def proc_status() -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def pin_to_one_core() -> int:
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def random_batches(n: int, batch: int, batches: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n, batch) for _ in range(batches)]


# ---------------------------------------------------------------------------------------------
# The two sides


def child_store(store_dir: str, batch: int, batches: int) -> dict:
    from lxmert_bench.data.store import FeatureStore

    cpu = pin_to_one_core()
    # evict our own store files from the page cache, so the first pass reads from disk
    for f in Path(store_dir).iterdir():
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    reset_peak()
    before = proc_status()
    t0 = time.perf_counter()
    store = FeatureStore.open(store_dir)
    open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    some_id = store._array("img_ids")[len(store) // 2].decode()
    row = store.row(some_id)
    lookup_s = time.perf_counter() - t0
    after_open = proc_status()
    assert row == len(store) // 2

    rows = random_batches(len(store), batch, batches)
    timings = {}
    for phase in ("cold", "warm"):
        reset_peak()
        start = proc_status()
        t0 = time.perf_counter()
        for r in rows:  # what the task readers do: one image at a time (tasks.ImageFeatures)
            out = [store.get_row(i) for i in r.tolist()]
            assert len(out) == batch and out[0]["features"].dtype == np.float32
        took = time.perf_counter() - t0
        end = proc_status()
        timings[phase] = {"s": took, "images_per_s": batch * batches / took,
                          "peak_rss_growth_mb": end["VmHWM"] - start["VmRSS"],
                          "anon_growth_mb": end["RssAnon"] - start["RssAnon"],
                          "file_mapped_mb": end["RssFile"] - start["RssFile"]}
    return {"cpu": cpu, "images": len(store), "open_s": open_s, "first_lookup_s": lookup_s,
            "open_rss_mb": after_open["VmHWM"] - before["VmRSS"], "batches": timings,
            "feature_dtype": store.feature_dtype}


def official_load_obj_tsv(fname: str, topk: int | None = None) -> list[dict]:
    """The official loader's behaviour (LXMERT_FACTS §4): every row decoded into RAM."""
    data = []
    with open(fname) as f:
        reader = csv.DictReader(f, FIELDNAMES, delimiter="\t")
        for item in reader:
            for key in ("img_h", "img_w", "num_boxes"):
                item[key] = int(item[key])
            boxes = item["num_boxes"]
            decode_config = [("objects_id", (boxes,), np.int64),
                             ("objects_conf", (boxes,), np.float32),
                             ("attrs_id", (boxes,), np.int64),
                             ("attrs_conf", (boxes,), np.float32),
                             ("boxes", (boxes, 4), np.float32),
                             ("features", (boxes, -1), np.float32)]
            for key, shape, dtype in decode_config:
                item[key] = np.frombuffer(base64.b64decode(item[key]), dtype=dtype).reshape(shape)
                item[key].setflags(write=False)
            data.append(item)
            if topk is not None and len(data) == topk:
                break
    return data


def child_official(tsv: str, batch: int, batches: int) -> dict:
    csv.field_size_limit(sys.maxsize)
    cpu = pin_to_one_core()
    reset_peak()
    before = proc_status()
    t0 = time.perf_counter()
    data = official_load_obj_tsv(tsv)
    load_s = time.perf_counter() - t0
    after = proc_status()
    rows = random_batches(len(data), batch, batches)
    t0 = time.perf_counter()
    for r in rows:
        # what the official datasets do per item: copy, normalise boxes, then the collate stack
        feats, boxes = [], []
        for i in r.tolist():
            item = data[i]
            b = item["boxes"].copy()
            b[:, (0, 2)] /= item["img_w"]
            b[:, (1, 3)] /= item["img_h"]
            feats.append(item["features"].copy())
            boxes.append(b)
        np.stack(feats), np.stack(boxes)
    took = time.perf_counter() - t0
    return {"cpu": cpu, "images": len(data), "open_s": load_s,
            "open_rss_mb": after["VmHWM"] - before["VmRSS"],
            "resident_mb": after["VmRSS"] - before["VmRSS"],
            "batches": {"in_ram": {"s": took, "images_per_s": batch * batches / took}}}


# ---------------------------------------------------------------------------------------------
# Driver


def make_tsv(path: Path, images: int, dim: int, seed: int = 0) -> float:
    from lxmert_bench.data.features import write_obj_tsv

    rng = np.random.default_rng(seed)

    def items():
        for i in range(images):
            h, w = 480, 640
            x1, y1 = rng.uniform(0, w - 2, 36), rng.uniform(0, h - 2, 36)
            boxes = np.stack([x1, y1, rng.uniform(x1 + 1, w), rng.uniform(y1 + 1, h)], 1)
            yield {"img_id": f"COCO_val2014_{i:012d}", "img_h": h, "img_w": w,
                   "objects_id": rng.integers(0, 1600, 36), "objects_conf": rng.random(36, np.float32),
                   "attrs_id": rng.integers(0, 400, 36), "attrs_conf": rng.random(36, np.float32),
                   "num_boxes": 36, "boxes": boxes.astype(np.float32),
                   "features": rng.random((36, dim), np.float32)}

    t0 = time.perf_counter()
    write_obj_tsv(path, items())
    return time.perf_counter() - t0


def run_child(side: str, target: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", side, target, "--batch", str(args.batch),
           "--batches", str(args.batches)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{side} side failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "lxmert_bench_feature_loading"),
                   help="where the TSV and the store are generated (and reused)")
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--feature-dim", type=int, default=2048)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--fp16", action="store_true", help="store features as float16")
    p.add_argument("--skip-official", action="store_true", help="only measure the store")
    p.add_argument("--json", help="also write the measurements here")
    p.add_argument("--child", nargs=2, metavar=("SIDE", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        side, target = args.child
        fn = child_store if side == "store" else child_official
        print(json.dumps(fn(target, args.batch, args.batches)))
        return 0

    from lxmert_bench.data.store import ensure_store

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    tsv = root / f"bench_{args.images}x{args.feature_dim}_obj36.tsv"
    store_dir = root / f"store_{args.images}x{args.feature_dim}_{'fp16' if args.fp16 else 'fp32'}"
    setup = {}
    if not tsv.is_file():
        print(f"writing {tsv} ({args.images} images x 36 x {args.feature_dim}) ...", flush=True)
        setup["write_tsv_s"] = make_tsv(tsv, args.images, args.feature_dim)
    existed = (store_dir / "index.json").is_file()
    t0 = time.perf_counter()
    store = ensure_store([tsv], store_dir, feature_dtype="float16" if args.fp16 else "float32")
    if not existed:
        setup["convert_s"] = time.perf_counter() - t0
        setup["convert_mb_per_s"] = tsv.stat().st_size / 1e6 / setup["convert_s"]
    tsv_gb, store_gb = tsv.stat().st_size / 1e9, store.nbytes() / 1e9
    print(f"TSV {tsv_gb:.2f} GB, store {store_gb:.2f} GB ({store.feature_dtype}), "
          + ", ".join(f"{k} {v:.1f}" for k, v in setup.items()), flush=True)

    ours = run_child("store", str(store_dir), args)
    theirs = None
    if not args.skip_official:
        need_mb = args.images * 36 * args.feature_dim * 4 / 2**20 * 1.3
        if mem_available_mb() < need_mb + 2048:
            print(f"skipping the official loader: it needs ~{need_mb:.0f} MB, "
                  f"{mem_available_mb():.0f} MB available")
        else:
            theirs = run_child("official", str(tsv), args)

    cold, warm = ours["batches"]["cold"], ours["batches"]["warm"]
    rows = [
        ("open / load (s)", ours["open_s"] + ours["first_lookup_s"], theirs and theirs["open_s"]),
        ("RSS growth to open / load (MB)", ours["open_rss_mb"], theirs and theirs["open_rss_mb"]),
        (f"random batches of {args.batch}, cold (img/s)", cold["images_per_s"], None),
        (f"random batches of {args.batch}, warm (img/s)", warm["images_per_s"],
         theirs and theirs["batches"]["in_ram"]["images_per_s"]),
        ("peak RSS growth while reading, cold (MB)", cold["peak_rss_growth_mb"], None),
        ("  of which shared file pages (page cache)", cold["file_mapped_mb"], None),
        ("  of which private (the output batch)", cold["anon_growth_mb"], None),
        ("time to first batch (s)",
         ours["open_s"] + ours["first_lookup_s"] + cold["s"] / args.batches,
         theirs and theirs["open_s"] + theirs["batches"]["in_ram"]["s"] / args.batches),
    ]
    print(f"\n{ours['images']} images x 36 x {args.feature_dim}, one core each side "
          f"(store cpu {ours['cpu']}{'' if not theirs else ', official cpu ' + str(theirs['cpu'])})")
    print(f"{'':45s} {'store':>12s} {'official':>12s} {'store better by':>15s}")
    for name, a, b in rows:
        # times and memory: official / store; throughput: store / official
        better = (a / b if "img/s" in name else b / a) if b and a else None
        ratio = f"{better:14.1f}x" if better is not None else f"{'':15s}"
        bs = f"{b:12.3f}" if b is not None else f"{'-':>12s}"
        print(f"{name:45s} {a:12.3f} {bs} {ratio}")
    ok = {
        "open < 1 s": ours["open_s"] + ours["first_lookup_s"] < TARGETS["open_s"],
        "open RSS < 100 MB": ours["open_rss_mb"] < TARGETS["open_rss_mb"],
        ">= 5000 img/s (warm)": warm["images_per_s"] >= TARGETS["images_per_s"],
        ">= 5000 img/s (cold)": cold["images_per_s"] >= TARGETS["images_per_s"],
    }
    print("targets: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in ok.items()))
    if args.json:
        from lxmert_bench.io import atomic_write_json

        atomic_write_json(args.json, {"args": {k: v for k, v in vars(args).items() if k != "child"},
                                      "setup": setup, "tsv_gb": tsv_gb, "store_gb": store_gb,
                                      "store": ours, "official": theirs, "targets": ok})
    return 0


if __name__ == "__main__":
    sys.exit(main())
