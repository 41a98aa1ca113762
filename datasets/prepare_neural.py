#!/usr/bin/env python
"""Convert neural cell data in the authors' layout to COCO JSON: neural_{train,val,test}.json.

    python datasets/prepare_neural.py --source /data/neural

reads <source>/{train,val,test}/<name>.<ext> (grayscale 512x640 images) with the colour-coded label
image <source>/mask/<name>.png (one colour per cell; grey, black and white are background) and
writes $OBJGUIDED_DATASETS/neural/neural_{train,val,test}.json (RLE masks, images left in place).
"""

import argparse
import os

from objguided_d2.data import datasets_root
from objguided_d2.data.convert import convert_phase_folders
from objguided_d2.data.formats import LABEL_ENCODINGS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="folder holding train/ val/ test/ mask/")
    parser.add_argument("--encoding", default="auto", choices=LABEL_ENCODINGS, help="label images")
    parser.add_argument(
        "--output", default=None, help="output folder (default: $OBJGUIDED_DATASETS/neural)"
    )
    args = parser.parse_args()
    output = args.output or os.path.join(datasets_root(), "neural")
    report = convert_phase_folders(args.source, "mask", output, "neural", args.encoding)
    for split, counts in report.items():
        print(f"neural_{split}: {counts['images']} images, {counts['instances']} instances")
    print(f"wrote {os.path.abspath(output)}")


if __name__ == "__main__":
    main()
