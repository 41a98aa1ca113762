#!/usr/bin/env python
"""Convert plant leaf segmentation data (CVPPP) to COCO JSON: plant_{train,val,test}.json.

    python datasets/prepare_plant.py --source /data/CVPPP2017_LSC_training
    python datasets/prepare_plant.py --source /data/plant --splits /data/plant_splits

Two layouts are read:
- CVPPP as distributed: <source>/**/<name>_rgb.png with the label image <name>_label.png beside it
  (palette-indexed, or colour-coded). Splits: --splits holds {train,val,test}.txt listing names as
  <subfolder>/<name> (e.g. A1/plant001); without it, a seeded 6:2:2 split. The lists used are
  written to <output>/splits/.
- The authors' layout: <source>/{train,val,test}/<name>.png with <source>/masks/<name>.png.
Output: $OBJGUIDED_DATASETS/plant/plant_{train,val,test}.json (RLE masks, images left in place).
"""

import argparse
import os
from pathlib import Path

from objguided_d2.data import datasets_root
from objguided_d2.data.convert import convert_cvppp, convert_phase_folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="CVPPP folder or authors' plant folder")
    parser.add_argument("--splits", default=None, help="CVPPP: folder of {train,val,test}.txt")
    parser.add_argument("--seed", type=int, default=0, help="CVPPP without --splits: split seed")
    parser.add_argument(
        "--output", default=None, help="output folder (default: $OBJGUIDED_DATASETS/plant)"
    )
    args = parser.parse_args()
    output = args.output or os.path.join(datasets_root(), "plant")
    if (Path(args.source) / "masks").is_dir():
        report = convert_phase_folders(args.source, "masks", output, "plant")
    else:
        report = convert_cvppp(args.source, output, args.splits, args.seed)
    for split, counts in report.items():
        print(f"plant_{split}: {counts['images']} images, {counts['instances']} instances")
    print(f"wrote {os.path.abspath(output)}")


if __name__ == "__main__":
    main()
