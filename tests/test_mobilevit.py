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


def analytic_flops(model, shape):
    """FLOPs (2 x multiply-adds) per module of one image, from each module's own shapes: convolutions
    2 * out elements * in-channels-per-group * kh * kw, linears 2 * rows * in * out, and the two
    products of each attention (q k^T, attn v) 2 * 2 * batch * heads * N^2 * head_dim. Written for
    the test from the layer definitions, with forward hooks (no FlopCounterMode)."""
    from timm.models.vision_transformer import Attention

    flops, handles = {}, []

    def hook(name):
        def count(mod, inp, out):
            x = inp[0]
            if isinstance(mod, torch.nn.Conv2d):
                f = 2 * out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            elif isinstance(mod, torch.nn.Linear):
                f = 2 * (x.numel() // mod.in_features) * mod.in_features * mod.out_features
            else:
                B, N, _ = x.shape
                f = 2 * 2 * B * mod.num_heads * N * N * mod.head_dim
            flops[name] = flops.get(name, 0) + f
        return count

    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear, Attention)):
            handles.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(torch.zeros(1, *shape))
    finally:
        for h in handles:
            h.remove()
    return flops


def test_flop_count_and_transformer_share_at_the_configured_size(mobilevit):
    from vitmerge.models.flops import count_flops

    assert input_shape(mobilevit) == (3, 256, 256)
    parts = analytic_flops(mobilevit, (3, 256, 256))
    total = sum(parts.values())
    inside = sum(f for name, f in parts.items() if ".transformer." in name)
    assert count_flops(mobilevit) == total
    assert transformer_flop_share(mobilevit) == pytest.approx(inside / total, rel=1e-12)
    assert 0.5 < inside / total < 0.54  # what docs/methods/mobilevit.md quotes (0.52 for mobilevit_xxs)
    # another input size: FLOPs follow the shape given, not the configured one
    small = analytic_flops(mobilevit, (3, 128, 128))
    assert count_flops(mobilevit, (3, 128, 128)) == sum(small.values()) < total


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
