"""Calibration: what is fitted to a model from real images, and nothing else.

* :mod:`.quantize` - static INT8 quantization (explicit Q/DQ) with ONNX Runtime's tooling;
* :mod:`.vocabulary` - the visual-word vocabulary of the vwt method (spherical k-means over patches).
"""
CALIBRATION_METHODS = ("entropy", "minmax", "percentile")  # ONNX Runtime's static calibrators
