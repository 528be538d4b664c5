"""The embedded default job (``vitmerge demo``, README's main command) and its cached demo models.

* :mod:`.digits` - a small timm ViT trained offline on scikit-learn's handwritten digits (cached);
* :mod:`.job` - the end-to-end demo composed from the library: methods x budgets, verified ONNX,
  INT8, accuracy and latency in ONNX Runtime, plots and a report.
"""
from .job import DemoResult, DemoSettings, run, vit_latency

__all__ = ["DemoSettings", "DemoResult", "run", "vit_latency"]
