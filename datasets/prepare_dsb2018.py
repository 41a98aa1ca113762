#!/usr/bin/env python
"""Convert DSB2018 (Kaggle layout) to COCO JSON: dsb2018_{train,val,test}.json.

    python datasets/prepare_dsb2018.py --source /data/dsb2018

reads <source>/stage1_train/<id>/images/<id>.png and <id>/masks/*.png (one binary PNG per nucleus)
and writes $OBJGUIDED_DATASETS/dsb2018/dsb2018_{train,val,test}.json (RLE masks; the images stay
where they are). Train and val are the paper's lists in datasets/splits/dsb2018/; test is every
other stage1_train id. Empty mask files are reported and skipped.
"""

import argparse
import os
import time
from pathlib import Path

from objguided_d2.data import datasets_root
from objguided_d2.data.convert import convert_dsb2018

SHIPPED_SPLITS = Path(__file__).resolve().parent / "splits" / "dsb2018"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="folder holding stage1_train/")
    parser.add_argument(
        "--splits", default=str(SHIPPED_SPLITS), help="folder of train.txt, val.txt"
    )
    parser.add_argument(
        "--output", default=None, help="output folder (default: $OBJGUIDED_DATASETS/dsb2018)"
    )
    args = parser.parse_args()
    output = args.output or os.path.join(datasets_root(), "dsb2018")
    start = time.perf_counter()
    report = convert_dsb2018(args.source, args.splits, output)
    for split in ("train", "val", "test"):
        counts = report[split]
        note = " (every stage1_train id is in train.txt or val.txt)" if not counts["images"] else ""
        print(f"dsb2018_{split}: {counts['images']} images, {counts['instances']} instances{note}")
    for path in report["empty_masks"]:
        print(f"skipped empty mask {path}")
    print(f"wrote {os.path.abspath(output)} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
