"""calibration: the bottom layer. Image sources, preprocessing (PIL + NumPy only), deterministic
calibration/evaluation splits, caching, and range estimation. It knows nothing of exporters or the zoo."""
from .dataset import DEFAULT_CALIB_SIZE, DEFAULT_EVAL_SIZE, SAMPLE_PHOTOS, CalibrationSet, split_items
from .errors import BadImageError, CalibrationError
from .images import load_image, normalize, preprocess_file, preprocess_pil, resize_crop, to_pixels
from .spec import IMAGENET_MEAN, IMAGENET_STD, InputSpec, derive_spec

__all__ = ["CalibrationSet", "CalibrationError", "BadImageError", "InputSpec", "derive_spec", "IMAGENET_MEAN", "IMAGENET_STD",
           "load_image", "normalize", "resize_crop", "to_pixels", "preprocess_file", "preprocess_pil", "split_items", "DEFAULT_CALIB_SIZE",
           "DEFAULT_EVAL_SIZE", "SAMPLE_PHOTOS"]
