"""Deployment packaging: a Triton Inference Server model repository from an ONNX file or engine."""
from .triton import PackageResult, Signature, TensorSpec, config_text, engine_signature, onnx_signature, package

__all__ = ["package", "PackageResult", "Signature", "TensorSpec", "config_text", "onnx_signature", "engine_signature"]
