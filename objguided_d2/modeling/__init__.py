"""The object-guided model's modules; importing them registers them in detectron2's registries.

Data flow of the mask branch: :mod:`.roi_crops` (ROI pyramids, groups, crops) ->
:mod:`.fusion` (the S modules) on :mod:`.padded_layers` -> the seg head in :mod:`.roi_heads` ->
:mod:`.mask_windows` (paste-back, mask NMS); :mod:`.point_sampling` trains the refinement.
"""

from . import backbone, baselines, center_head, meta_arch, roi_heads  # noqa: F401
