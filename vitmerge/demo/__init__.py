"""The embedded default job (``vitmerge demo``, README's main command) and its cached demo models.

* :mod:`.digits` - a small timm ViT trained offline on scikit-learn's handwritten digits (cached);
* :mod:`.clipmodels` - the video (VideoMAE) and audio (AST) demo models trained on generated data (cached);
* :mod:`.job` - the end-to-end demo composed from the library: methods x budgets, verified ONNX,
  INT8, accuracy and latency in ONNX Runtime, plots and a report (video / audio rows with ``--clips``).
"""
from .job import CLIP_ROWS, DemoResult, DemoSettings, run, vit_latency

__all__ = ["DemoSettings", "DemoResult", "run", "vit_latency", "CLIP_ROWS"]
