"""Data: labelled image sets from local folders (never downloaded) and the preprocessing each model
expects.

* :mod:`.datasets` - ImageNet val, CIFAR-100, Oxford-IIIT Pet, MNIST / Fashion-MNIST IDX files (:mod:`.idx`) and
  ImageFolder layouts
  (``open_dataset``; torchvision's readers where they exist), batching that counts unreadable
  images instead of failing;
* :mod:`.imagenet` - the ILSVRC2012 devkit's val labels and the ImageNet class-index orders;
* :mod:`.transforms` - timm data configs (``data_config``, ``transform_for``), also for bare ONNX files.
"""
from .datasets import (CALIBRATION_SPLITS, EVAL_SPLITS, IMAGE_SUFFIXES, LAYOUTS, BatchStats, ImageDataset, batches,
                       open_dataset)
from .imagenet import CLASS_ORDERS
from .transforms import data_config, data_config_for_onnx, eval_transform, transform_for

__all__ = ["ImageDataset", "open_dataset", "batches", "BatchStats", "LAYOUTS", "EVAL_SPLITS", "CALIBRATION_SPLITS",
           "IMAGE_SUFFIXES", "CLASS_ORDERS", "data_config", "data_config_for_onnx", "eval_transform", "transform_for"]
