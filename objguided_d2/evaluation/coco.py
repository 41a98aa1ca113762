"""detectron2's COCO evaluation, with the predicted masks RLE-encoded from their windows."""

from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import Instances

from .matching import encode_masks

__all__ = ["WindowCOCOEvaluator", "instances_to_coco_results"]


def instances_to_coco_results(instances: Instances, image_id: int) -> list[dict]:
    """detectron2's ``instances_to_coco_json`` (image_id, contiguous category_id, XYWH bbox,
    score, segmentation as a COCO RLE with str counts), the masks encoded here: from their
    windows where the model gives :class:`.MaskWindows` (detectron2 writes out every mask at
    full size, which at 20 megapixels costs more than the model)."""
    instances = instances.to("cpu")
    fields = {name: instances.get(name) for name in instances.get_fields() if name != "pred_masks"}
    results = instances_to_coco_json(Instances(instances.image_size, **fields), image_id)
    if instances.has("pred_masks"):
        for result, rle in zip(results, encode_masks(instances.pred_masks), strict=True):
            result["segmentation"] = {**rle, "counts": rle["counts"].decode("utf-8")}
    return results


class WindowCOCOEvaluator(COCOEvaluator):
    """detectron2's ``COCOEvaluator`` (same options, results and files), its predictions
    encoded by :func:`instances_to_coco_results`."""

    def process(self, inputs, outputs):
        for input, output in zip(inputs, outputs):
            if "instances" in output:
                results = instances_to_coco_results(output["instances"], input["image_id"])
                self._predictions.append({"image_id": input["image_id"], "instances": results})
