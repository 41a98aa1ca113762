#!/usr/bin/env python
"""Convert a folder of images with instance label images to one COCO JSON (RLE masks).

    python datasets/prepare_label_folder.py --images data/images --labels data/masks \
        --output datasets/mydata/mydata_train.json
    python datasets/prepare_label_folder.py --images data/train --labels data/train \
        --label-suffix _masks --output datasets/cellpose_train.json     # Cellpose naming

The image <images>/<name><image-suffix>.<ext> goes with <labels>/<name><label-suffix>.<ext>
(ext: png, tif, tiff, jpg, jpeg, bmp). Label images: 0 = background, one value per instance
(uint8/uint16/int32 PNG or TIFF, palette PNG, grey saved as RGB), or colour-coded RGB (--encoding
color); JPEG labels are refused (lossy), and so is a label image whose size differs from its
image's. An id made of several separate regions is reported (one instance each with
--split-components). Register the result with objguided_d2.data.register_coco_instances_dataset
(see datasets/README.md).
"""

import argparse

from objguided_d2.data.convert import convert_label_folder
from objguided_d2.data.formats import LABEL_ENCODINGS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="image folder")
    parser.add_argument("--labels", required=True, help="label image folder (may be --images)")
    parser.add_argument("--output", required=True, help="COCO JSON file to write")
    parser.add_argument("--image-suffix", default="", help="image name ending before the extension")
    parser.add_argument("--label-suffix", default="", help="label name ending, e.g. _masks")
    parser.add_argument("--encoding", default="auto", choices=LABEL_ENCODINGS, help="label images")
    parser.add_argument("--category", default="object", help="name of the one category")
    parser.add_argument("--recursive", action="store_true", help="also read subfolders")
    parser.add_argument(
        "--split-components",
        action="store_true",
        help="make each separate region of an id its own instance (default: one instance per id)",
    )
    args = parser.parse_args()
    counts = convert_label_folder(
        args.images,
        args.labels,
        args.output,
        image_suffix=args.image_suffix,
        label_suffix=args.label_suffix,
        encoding=args.encoding,
        thing_class=args.category,
        recursive=args.recursive,
        split=args.split_components,
    )
    print(f"{args.output}: {counts['images']} images, {counts['instances']} instances")


if __name__ == "__main__":
    main()
