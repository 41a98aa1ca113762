"""Config keys of the plugin: ``add_objguided_config(cfg)`` adds them to a detectron2 ``get_cfg()``.

Defaults follow the paper (Yi et al., IEEE TMI 2021) and, where it gives no number, the authors'
public code. Keys that only pick between the two are commented with both choices.
"""

from detectron2.config import CfgNode as CN
from detectron2.projects.point_rend import add_pointrend_config


def add_objguided_config(cfg: CN) -> None:
    """Add the ``MODEL.OBJGUIDED`` node and the shared input-pipeline keys to ``cfg`` (in place).

    Also adds PointRend's keys, so one call lets every config of the project (ObjGuided, Mask R-CNN
    and PointRend) merge. Calling it twice is harmless.
    """
    if "OBJGUIDED" in cfg.MODEL:
        return
    add_pointrend_config(cfg)
    _add_input_config(cfg)
    _add_engine_config(cfg)

    # fmt: off
    cfg.MODEL.OBJGUIDED = CN()
    _C = cfg.MODEL.OBJGUIDED

    # ---- Backbone: detectron2's ResNet (MODEL.RESNETS.DEPTH / NORM) + top-down "B" decoder ----
    # Output channels of the B modules at strides 16, 8, 4. Empty: those of the ResNet stage each
    # one fuses with (R-50: 1024, 512, 256 as the authors; R-18/34: 256, 128, 64).
    _C.DECODER_CHANNELS = []
    # Norm of the B modules ("BN" as the authors, "GN", "SyncBN", "" for none).
    _C.DECODER_NORM = "BN"

    # ---- Center-keypoint detection head (on the stride-4 decoder map) ----
    _C.IN_FEATURE = "dec4"           # feature map the heads run on
    _C.HEAD_CHANNELS = 256           # hidden channels of the heatmap / width-height / offset heads
    _C.WH_KERNEL_SIZE = 7            # kernel of both width-height convs (authors 7; CenterNet 3)
    _C.HEATMAP_PRIOR_BIAS = -2.19    # initial bias of the heatmap logits (sigmoid = 0.1)
    _C.GAUSSIAN_MIN_OVERLAP = 0.7    # IoU that fixes the Gaussian radius of a center (CenterNet)
    _C.MAX_OBJECTS = 500             # cap on detection targets per image (the mask branch uses all)
    _C.FOCAL_ALPHA = 2.0             # penalty-reduced focal loss: focusing exponent
    _C.FOCAL_BETA = 4.0              # penalty-reduced focal loss: exponent on (1 - gaussian)
    _C.HEATMAP_LOSS_WEIGHT = 1.0     # weight of the focal heatmap loss
    _C.WH_LOSS_WEIGHT = 0.1          # authors' weight; the paper gives none
    _C.OFFSET_LOSS_WEIGHT = 1.0      # weight of the sub-pixel center offset loss
    _C.REGRESSION_LOSS = "l1"        # "l1" (authors' code) or "smooth_l1" (paper, Eq. 2 and 5)
    # The keypoint of an object: "box", its box centre, from which the size head predicts the
    # box's width and height (paper); "interior", its innermost pixel (the farthest from the
    # background), from which the size head predicts the distances to the box's left, top, right
    # and bottom sides. The box centre of a thin, branching cell usually lies on background.
    _C.CENTER_POINT = "box"
    # What the detector learns of an object that the training crop cuts: "visible", the part in
    # the crop, as if it were the whole object (paper and authors); "whole", the whole object's
    # keypoint (no heatmap peak where it lies outside the crop) and only the box sides the crop
    # keeps (no size target for a side it cuts off). A crop cuts most large objects. On the
    # synthetic neural-like cells "whole" lowers the heatmap loss, not APseg (docs/accuracy.md).
    _C.CROPPED_OBJECTS = "visible"
    # The size head predicts the log of its sizes in output cells (True) or the sizes (False,
    # paper and authors).
    _C.WH_LOG_SPACE = False
    # The size head starts at the typical training object, INPUT.OBJECT_SIZE (its output bias),
    # instead of at size 0 (False, the authors): from scratch, a short schedule under-predicts
    # the larger objects otherwise.
    _C.WH_INIT_OBJECT_SIZE = False
    _C.TOPK_CENTERS = 500            # peaks kept after the 3x3 max-pool
    _C.SCORE_THRESH_TEST = 0.3       # minimum center score of a detection

    # ---- Object-guided ROI mask branch ----
    _C.BOX_ENLARGE = 1.1             # ROIs are the boxes scaled by this about their centre
    # The same for the predicted boxes at inference; 0: BOX_ENLARGE. The mask branch segments its
    # whole ROI, so a wider one recovers the parts of an object that a too small box cuts off.
    _C.BOX_ENLARGE_TEST = 0.0
    # Training ROIs: each ground-truth box shifted by up to half this fraction of its size and its
    # sides scaled by 1 +- this (uniform), so that the mask branch also learns from boxes that are
    # off, as predicted ones are at inference. 0: the exact boxes (authors).
    _C.TRAIN_BOX_JITTER = 0.0
    _C.MIN_ROI_SIZE = 2.0            # crop levels stop at the first one with an ROI side below this
    # Level-0 crops on whole pixels, one pixel apart (True), or on the authors' grid, which spans
    # the enlarged box end to end (False): the authors' grid samples between pixels, so a 1-px
    # protrusion reaches the mask branch, its ground truth and the pasted mask as two half-pixels.
    _C.ROI_PIXEL_GRID = False
    # Feature maps cropped at strides 2, 4, 8, 16 (stride 1 is a two-conv stem on the image).
    _C.ROI_FEATURES = ["stem", "dec4", "dec8", "dec16"]
    _C.IMAGE_CONV_CHANNELS = 64      # channels of the stride-1 level
    _C.INSTANCE_NORM_AFFINE = False  # learnable gamma/eta of Eq. 6 (paper) or none (authors)
    _C.MASK_LOSS_WEIGHT = 2.0        # BCE on soft ROI masks; authors' weight
    # Weight of a soft Dice loss (1 - Dice of each ROI's probabilities with its soft ground truth)
    # added to the mask BCE; 0: BCE alone (paper and authors). Dice is not swamped by the
    # background of a box that a thin object fills a few per cent of.
    _C.MASK_DICE_WEIGHT = 0.0
    # Keypoint guidance: a Gaussian at each ROI's keypoint (the detector's; the ground truth's in
    # training), of this width as a fraction of the ROI's side, added to its crops at every level
    # through a learned 1x1 projection, so that the branch knows which object of a box that holds
    # several to segment. 0: none (paper and authors).
    _C.KEYPOINT_GUIDANCE_SIGMA = 0.0
    _C.MASK_THRESH_TEST = 0.53       # threshold of the pasted-back masks (authors' default)
    # At inference, replace each predicted box this many times by the tight box of the mask the
    # branch segments from it, then segment from the result: the masks place and size the boxes
    # better than a briefly trained detector. 0: the detector's boxes (paper and authors).
    _C.BOX_REFINE_STEPS = 0
    # The ROIs of those refinement passes are the boxes scaled by this; 0: BOX_ENLARGE_TEST. A
    # wide one lets the mask, and so the refined box, reach past a box that is too small.
    _C.BOX_REFINE_ENLARGE = 0.0
    # Paste-back: True, each pixel is the weighted mean of the ROI samples splatted onto it, the
    # canvas resized bilinearly to the original size; False, the authors' sum of the splatted
    # votes (below the mean wherever samples lie more than a pixel apart), resized by nearest
    # neighbour.
    _C.PASTE_NORMALIZED = True
    # At inference, multiply each detection's keypoint score by its mask's confidence, the mean
    # probability over the ROI pixels it segments (SOLOv2's "maskness"), so that masks the branch
    # is unsure of rank below confident ones. False: the keypoint score alone (paper and authors).
    _C.MASK_CONFIDENCE_SCORE = False
    # The confidence's exponent in that product: above 1, the mask's confidence weighs more than
    # the keypoint score in the ranking (scores fall, so TEST.BIO_SCORE_THRESH falls with it).
    _C.MASK_CONFIDENCE_POWER = 1.0
    # A learned mask-quality score (Mask Scoring R-CNN's MaskIoU head, a departure from the
    # paper): a small head on each ROI's level-0 features and mask probabilities predicts the IoU
    # of its mask with the object it covers best, and inference multiplies the score by it (after
    # the confidence, with MASK_CONFIDENCE_SCORE). It learns from the ground-truth ROIs and from
    # the detector's top TRAIN_DETECTIONS detections of each training image, segmented as at test
    # time, on detached inputs: the rest of the model trains as without it (measured on the
    # synthetic neural-like cells and left off there: docs/accuracy.md).
    _C.MASK_IOU_HEAD = CN()
    _C.MASK_IOU_HEAD.ENABLED = False         # False: no such head (paper and authors)
    _C.MASK_IOU_HEAD.LOSS_WEIGHT = 1.0       # weight of its BCE against the masks' IoUs
    _C.MASK_IOU_HEAD.TRAIN_DETECTIONS = 16   # detections per training image it also learns from
    _C.MASK_IOU_HEAD.SCORE_POWER = 1.0       # the predicted IoU's exponent in the score
    # At inference, keep each mask's largest 8-connected component only, so that the stray
    # fragments a mask picks up on its neighbours (or on noise) do not count against it. False:
    # every fragment (paper and authors).
    _C.MASK_LARGEST_COMPONENT = False
    _C.MASK_NMS_THRESH = 0.2         # mask IoU above which a lower-scored mask is suppressed
    # Before that NMS, decay each mask's score by its overlaps with the masks scored above it,
    # as SOLOv2's Matrix NMS with a Gaussian kernel of this sigma (2.0 there), so that a mask
    # overlapping a better one drops in the ranking instead of out of it (a test-time departure
    # from the paper). 0: none (paper and authors).
    _C.MASK_MATRIX_NMS_SIGMA = 0.0
    # At inference, segment each ROI also in copies of the input flipped so ("horizontal",
    # "vertical", "both": turned by 180 degrees) and average its mask probabilities over them,
    # the confidence of MASK_CONFIDENCE_SCORE included; each flip costs one more backbone and
    # mask-branch pass. The detector reads the input alone. []: none (paper and authors).
    _C.MASK_TEST_FLIPS = []
    # With MASK_TEST_FLIPS, multiply each detection's score by the agreement of its views, the
    # mean IoU of its ROI mask (at MASK_THRESH_TEST) in each flipped view with its mask in the
    # input, to this power: the views disagree where the branch is unsure. 0, or no flips: none
    # (so that MASK_TEST_FLIPS [] alone gives one pass).
    _C.MASK_FLIP_AGREEMENT_POWER = 0.0
    # Network inputs with a side above TILE_SIZE (e.g. large images at INPUT.TEST_SCALE) are
    # segmented in overlapping tiles of that side; an object is kept from the tile whose core
    # (the tile less half of each overlap) holds its keypoint, and mask NMS runs across tiles.
    # 0: the test size (INPUT.TEST_IMAGE_SIZE, else IMAGE_SIZE). TEST.DETECTIONS_PER_IMAGE
    # caps each tile.
    _C.TILE_SIZE = 0
    # Overlap of neighbouring tiles (network-input px): objects up to about this size are never
    # cut by a tile's border. 0: a quarter of the tile size.
    _C.TILE_OVERLAP = 0
    # GT instances per training image that get a mask ROI; 0 = all of them (authors).
    _C.MAX_TRAIN_ROIS_PER_IMAGE = 0

    # ---- Auxiliary feature refinement (training only; no cost at inference) ----
    _C.REFINE = CN()
    _C.REFINE.ENABLED = True         # the paper's "W. Refine"; False gives "W.O. Refine"
    # "biased": the beta*N most uncertain of k*N random points; "uniform": beta*N random points.
    _C.REFINE.SAMPLING = "biased"
    _C.REFINE.OVERSAMPLE_RATIO = 3.0   # k of the paper's Table II
    _C.REFINE.IMPORTANCE_RATIO = 0.75  # beta of the paper's Table II
    _C.REFINE.POINT_DENSITY = 8        # D: N = H * W / D points per ROI
    _C.REFINE.LOSS_WEIGHT = 1.0        # weight of the point-head BCE (authors: 1)
    # fmt: on


def _add_input_config(cfg: CN) -> None:
    """Keys of the input pipeline that every architecture of the project shares."""
    # fmt: off
    _C = cfg.INPUT
    _C.IMAGE_SIZE = 512              # side of the square training input; longest side at test
    # Longest side at test when it differs from training (e.g. training on crops); 0: IMAGE_SIZE.
    _C.TEST_IMAGE_SIZE = 0
    _C.SQUARE_CROP = CN()
    _C.SQUARE_CROP.ENABLED = True    # random square crop of side max(H, W) * scale (paper)
    # Scales s of the crop side, drawn uniformly (the authors' U{0.6, 0.7, ..., 1.3}).
    _C.SQUARE_CROP.SCALES = [0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3]
    # Crop centres stay this far (px) from the image edges, halved until the image leaves room
    # (authors' border 128; their swapped width/height is not reproduced). 0: anywhere.
    _C.SQUARE_CROP.CENTER_MARGIN = 128
    _C.HFLIP_TRAIN = True            # horizontal flip with p = 0.5
    # Vertical flip with p = 0.5 as well (not in the paper): with the horizontal flip, every
    # mirror image of an object whose appearance has no up or down.
    _C.VFLIP_TRAIN = False
    # Test-time resize: "fit" (longest side to the test size, aspect kept) or "stretch" (authors:
    # both sides to it). Predictions always come back at the original resolution.
    _C.TEST_RESIZE = "fit"
    # Scale test images by this factor instead (aspect kept; 0: resize as TEST_RESIZE says), e.g.
    # so that a user's objects match the training scale (tools/predict.py --object-size).
    _C.TEST_SCALE = 0.0
    # Typical object diameter, sqrt(box width x height), in pixels at the test scale of the
    # training images: the median over DATASETS.TRAIN, measured when a training run starts with 0
    # here and recorded in its config.yaml.
    _C.OBJECT_SIZE = 0.0
    _C.MIN_INSTANCE_SIZE = 2         # instances whose box is thinner than this (pixels) are dropped
    # After the augmentations, keep each mask's largest 4-connected component only (authors: True,
    # with MIN_INSTANCE_SIZE 4) or every fragment of it in its mask and box (False).
    _C.GT_LARGEST_COMPONENT = False
    # fmt: on


def _add_engine_config(cfg: CN) -> None:
    """Keys of the training engine and its evaluators (``objguided_d2.engine.Trainer``)."""
    # fmt: off
    # Optimizer of every architecture: "SGD" (detectron2's, with SOLVER.MOMENTUM / NESTEROV),
    # "ADAM" (the authors: Adam, constant LR 1.25e-4, no weight decay) or "ADAMW". All honour
    # SOLVER.BASE_LR, WEIGHT_DECAY(_NORM/_BIAS), BIAS_LR_FACTOR, CLIP_GRADIENTS and the LR schedule.
    cfg.SOLVER.OPTIMIZER = "SGD"
    # Users' datasets, registered when the config is loaded, so that DATASETS.TRAIN / TEST can
    # name them and a run's config.yaml brings them along: "NAME=FILE.json[,IMAGE_ROOT]" (COCO
    # instances) or "NAME=IMAGE_FOLDER[,LABEL_FOLDER[,LABEL_SUFFIX]]" (instance label images).
    cfg.DATASETS.REGISTER = []
    # Training stops (FloatingPointError, no final checkpoint) when the total loss exceeds this
    # multiple of its value at the run's first iteration: a diverging run whose loss stays finite
    # (Adam can carry it to 1e20) would otherwise end "successfully". 0: never.
    cfg.SOLVER.DIVERGENCE_RATIO = 1000.0
    # Score a prediction needs to enter the biology metrics (AJI, PQ, F1, counts); the AP metrics
    # rank all predictions instead.
    cfg.TEST.BIO_SCORE_THRESH = 0.5
    # Boxes of the paper-style APdet: "pred_boxes" (the model's, as COCO bbox AP) or "mask_tight"
    # (tight boxes of the predicted masks, the authors' evaluation).
    cfg.TEST.PAPER_AP_BOX_SOURCE = "pred_boxes"
    # fmt: on


def _positive(value) -> bool:
    return value > 0


def _non_negative(value) -> bool:
    return value >= 0


def _fraction(value) -> bool:
    return 0 <= value <= 1


# Keys of the plugin whose values other code would only fail on later, far from the key.
_VALID_VALUES = {
    "INPUT.IMAGE_SIZE": (_positive, "a positive side in pixels"),
    "INPUT.TEST_IMAGE_SIZE": (_non_negative, "a side in pixels, or 0 for INPUT.IMAGE_SIZE"),
    "INPUT.SQUARE_CROP.SCALES": (
        lambda scales: len(scales) > 0 and all(s > 0 for s in scales),
        "one or more positive crop scales",
    ),
    "INPUT.SQUARE_CROP.CENTER_MARGIN": (_non_negative, "a margin in pixels, 0 or more"),
    "INPUT.TEST_RESIZE": (lambda mode: mode in ("fit", "stretch"), "'fit' or 'stretch'"),
    "INPUT.TEST_SCALE": (_non_negative, "a positive factor, or 0 for INPUT.TEST_RESIZE"),
    "INPUT.OBJECT_SIZE": (_non_negative, "a diameter in pixels, or 0 for unknown"),
    "INPUT.MIN_INSTANCE_SIZE": (_non_negative, "a size in pixels, 0 or more"),
    "SOLVER.DIVERGENCE_RATIO": (_non_negative, "a ratio, or 0 for no check"),
    "TEST.BIO_SCORE_THRESH": (_fraction, "a score in [0, 1]"),
    "MODEL.OBJGUIDED.CENTER_POINT": (lambda p: p in ("box", "interior"), "'box' or 'interior'"),
    "MODEL.OBJGUIDED.CROPPED_OBJECTS": (
        lambda what: what in ("visible", "whole"),
        "'visible' or 'whole'",
    ),
    "MODEL.OBJGUIDED.REGRESSION_LOSS": (
        lambda loss: loss in ("l1", "smooth_l1"),
        "'l1' or 'smooth_l1'",
    ),
    "MODEL.OBJGUIDED.TOPK_CENTERS": (_positive, "a positive number of peaks"),
    "MODEL.OBJGUIDED.SCORE_THRESH_TEST": (_fraction, "a score in [0, 1]"),
    "MODEL.OBJGUIDED.BOX_ENLARGE": (_positive, "a positive factor"),
    "MODEL.OBJGUIDED.BOX_ENLARGE_TEST": (_non_negative, "a positive factor, or 0 for BOX_ENLARGE"),
    "MODEL.OBJGUIDED.TRAIN_BOX_JITTER": (lambda j: 0 <= j < 1, "a fraction in [0, 1)"),
    "MODEL.OBJGUIDED.MIN_ROI_SIZE": (_positive, "a positive size in level cells"),
    "MODEL.OBJGUIDED.MASK_DICE_WEIGHT": (_non_negative, "a weight, 0 or more"),
    "MODEL.OBJGUIDED.KEYPOINT_GUIDANCE_SIGMA": (_non_negative, "a fraction, or 0 for none"),
    "MODEL.OBJGUIDED.MASK_THRESH_TEST": (_fraction, "a probability in [0, 1]"),
    "MODEL.OBJGUIDED.MASK_CONFIDENCE_POWER": (_positive, "a positive exponent"),
    "MODEL.OBJGUIDED.MASK_IOU_HEAD.LOSS_WEIGHT": (_non_negative, "a weight, 0 or more"),
    "MODEL.OBJGUIDED.MASK_IOU_HEAD.TRAIN_DETECTIONS": (_non_negative, "a count, or 0 for none"),
    "MODEL.OBJGUIDED.MASK_IOU_HEAD.SCORE_POWER": (_positive, "a positive exponent"),
    "MODEL.OBJGUIDED.MASK_NMS_THRESH": (_fraction, "an IoU in [0, 1]"),
    "MODEL.OBJGUIDED.MASK_MATRIX_NMS_SIGMA": (_non_negative, "a sigma, or 0 for none"),
    "MODEL.OBJGUIDED.MASK_FLIP_AGREEMENT_POWER": (_non_negative, "an exponent, or 0 for none"),
    "MODEL.OBJGUIDED.MAX_TRAIN_ROIS_PER_IMAGE": (_non_negative, "a count, or 0 for all"),
    "MODEL.OBJGUIDED.BOX_REFINE_STEPS": (_non_negative, "a count, or 0 for none"),
    "MODEL.OBJGUIDED.BOX_REFINE_ENLARGE": (
        _non_negative,
        "a positive factor, or 0 for BOX_ENLARGE_TEST",
    ),
    "MODEL.OBJGUIDED.TILE_SIZE": (_non_negative, "a side in pixels, or 0 for the test size"),
    "MODEL.OBJGUIDED.TILE_OVERLAP": (
        _non_negative,
        "an overlap in pixels, or 0 for a quarter of the tile size",
    ),
}


def check_config(cfg: CN) -> None:
    """Raise ``ValueError`` naming the key and its value where a key of the plugin holds a value
    it cannot work with (``INPUT.IMAGE_SIZE 0``, ``INPUT.SQUARE_CROP.SCALES []``, ...)."""
    for key, (valid, expected) in _VALID_VALUES.items():
        value = cfg
        for part in key.split("."):
            value = value[part]
        if not valid(value):
            raise ValueError(f"Config key {key} is {value!r}; expected {expected}")
