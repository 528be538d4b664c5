"""Shared fixtures.

``digits_model``: the project's small real measurement — a timm ViT (32 px, patch 4: 64 patch
tokens + class token, depth 4, dim 96) trained on scikit-learn's handwritten digits. Trained once
(about a minute on one CPU core) and cached by configuration hash under the system temp folder
(``$VITMERGE_TEST_CACHE`` to choose the folder; ``VITMERGE_TEST_CACHE=fresh`` trains into this
session's temp folder). It is a :class:`vitmerge.demo.digits.DigitsModel`:

    digits_model.model_name, digits_model.kwargs   # timm.create_model(name, **kwargs) / build_model
    digits_model.checkpoint                         # .pth state dict
    digits_model.config_path                        # model.json (for --config)
    digits_model.test_dir, digits_model.train_dir   # ImageFolders of PNGs (449 / 1348 images)
    digits_model.build()                            # the trained, unmerged model in eval mode

``digits_onnx``: that model exported (and ORT-verified) unmerged and with ToMe r=8 per block:
a dict {"unmerged": Path, "merged": Path, "r": 8}.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """On a shared, busy CPU two OpenMP threads spinning against other processes run these small
    models several times slower than one; restored for the other test modules."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory):
    from vitmerge.demo import digits

    where = os.environ.get("VITMERGE_TEST_CACHE")
    if where == "fresh":
        root = tmp_path_factory.mktemp("digits")
    else:
        root = Path(where) if where else Path(tempfile.gettempdir()) / "vitmerge-test-cache"
    return digits.cached(root=root)


@pytest.fixture(scope="session")
def digits_onnx(digits_model, tmp_path_factory):
    import vitmerge

    out = tmp_path_factory.mktemp("digits_onnx")
    paths = {"r": 8}
    for key, r in (("unmerged", 0), ("merged", 8)):
        model = digits_model.build()
        if r:
            vitmerge.apply(model, method="tome", r=r)
        paths[key] = vitmerge.export(model, out / f"digits_{key}.onnx", batch_sizes=(2,)).path
    return paths
