"""MobileViT: a clear refusal to merge, and the plain model exports and verifies as the mobile baseline."""
import numpy as np
import pytest
import timm
import torch

import vitmerge
from vitmerge.errors import UnsupportedModelError
from vitmerge.backends.ort import session as ort_session
from vitmerge.models import input_shape
from vitmerge.models.mobilevit import is_mobilevit, transformer_flop_share


@pytest.fixture(scope="module")
def mobilevit():
    torch.manual_seed(0)
    return timm.create_model("mobilevit_xxs", pretrained=False).eval()


def test_apply_refuses_with_the_reason(mobilevit):
    for r in (0, 8):
        with pytest.raises(UnsupportedModelError, match="MobileViT folds every transformer token back.*vitmerge.export"):
            vitmerge.apply(mobilevit, "tome", r=r)
    assert not hasattr(mobilevit, "vitmerge")
    with pytest.raises(UnsupportedModelError, match="MobileViT folds"):
        vitmerge.apply(timm.create_model("mobilevitv2_050", pretrained=False), "tome", r=4)
    assert is_mobilevit(mobilevit) and not is_mobilevit(timm.create_model("vit_tiny_patch16_224", depth=1))


def test_input_shape_and_transformer_share(mobilevit):
    assert input_shape(mobilevit) == (3, 256, 256)
    share = transformer_flop_share(mobilevit)
    assert 0.5 < share < 0.54  # what docs/methods/mobilevit.md quotes (0.52 for mobilevit_xxs)


def test_flop_count_at_the_configured_size(mobilevit):
    from vitmerge.models.flops import count_flops

    assert abs(count_flops(mobilevit) / 1e9 - 0.815) < 0.01  # 2 x MACs of one 256 x 256 image, attention explicit


def test_input_shape_without_config():
    with pytest.raises(UnsupportedModelError, match="input size"):
        input_shape(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_plain_export_verifies(tmp_path, mobilevit):
    res = vitmerge.export(mobilevit, tmp_path / "mv.onnx", batch_sizes=(1, 2))
    assert res.verification.ok
    x = torch.randn(3, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = mobilevit(x).numpy()
    out = ort_session(tmp_path / "mv.onnx").run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4)
