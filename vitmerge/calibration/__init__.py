"""Image data from local folders, the digits demo model, and INT8 QDQ calibration.

* :mod:`.data` — ImageNet val / CIFAR-100 / Oxford-IIIT Pet / ImageFolder loaders with the model's
  own preprocessing (``open_dataset``, ``transform_for``).
* :mod:`.digits` — a small timm ViT trained offline on scikit-learn's digits (``digits.cached()``).
* :mod:`.quantize` — static INT8 QDQ quantization with ONNX Runtime's tooling (``quantize``).
"""
from .data import DataError, ImageDataset, data_config, open_dataset, transform_for

__all__ = ["DataError", "ImageDataset", "open_dataset", "data_config", "transform_for"]
