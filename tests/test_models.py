"""vitmerge.apply on timm models against the unpatched model and a hand-written float64 ToMe."""
import pytest
import timm
import torch

import vitmerge
from vitmerge.errors import ScheduleError, UnsupportedModelError
from vitmerge.models import last_source

from support.reference_tome import tome_forward

CONFIGS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=64, depth=4)),  # 16 patches + cls
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=80, depth=3)),  # 25 + cls + dist
    "vit_avgpool_no_cls": ("vit_tiny_patch16_224", dict(img_size=64, depth=3, class_token=False, global_pool="avg")),
    "vit_registers": ("vit_tiny_patch16_224", dict(img_size=64, depth=3, reg_tokens=2)),
    "vit_patch8_rect": ("vit_tiny_patch16_224", dict(img_size=(48, 64), patch_size=8, depth=3)),
}


def make(key, seed=0):
    name, kw = CONFIGS[key]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kw).eval()


def images(model, b=2, seed=1):
    h, w = model.patch_embed.img_size
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("key", list(CONFIGS))
def test_r0_equals_unpatched(key):
    model = make(key)
    x = images(model)
    with torch.no_grad():
        ref = model(x)
        vitmerge.apply(model, r=0)
        out = model(x)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("key", list(CONFIGS))
@pytest.mark.parametrize("prop_attn", [True, False])
def test_matches_handwritten_tome(key, prop_attn):
    model = make(key).double()
    x = images(model).double()
    rs = [3, 5, 2, 4][: len(model.blocks)]
    ref = tome_forward(model, x, rs, prop_attn=prop_attn)
    vitmerge.apply(model, r=rs, prop_attn=prop_attn)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_prop_attn_changes_output_only_when_merging():
    model = make("vit").double()
    x = images(model).double()
    with torch.no_grad():
        vitmerge.apply(model, r=4, prop_attn=True)
        on = model(x)
        vitmerge.remove(model)
        vitmerge.apply(model, r=4, prop_attn=False)
        off = model(x)
    assert (on - off).abs().max() > 1e-6


def test_token_schedule_is_what_runs():
    model = make("deit_distilled")
    vitmerge.apply(model, r=[9, 9, 9])
    info = model.vitmerge
    seen = []
    for blk in model.blocks:
        blk.mlp.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    with torch.no_grad():
        model(images(model))
    # 27 tokens (2 protected): one step removes at most half of the unprotected
    assert info.tokens == [(27, 9, 18), (18, 8, 10), (10, 4, 6)]
    assert seen == info.tokens_out
    assert info.protected == 2


def test_state_dict_unchanged_and_remove_restores():
    model = make("vit")
    keys = list(model.state_dict())
    x = images(model)
    with torch.no_grad():
        ref = model(x)
        vitmerge.apply(model, r=5)
        assert list(model.state_dict()) == keys
        assert not torch.equal(model(x), ref)
        vitmerge.remove(model)
        assert torch.equal(model(x), ref)
    assert type(model) is timm.models.vision_transformer.VisionTransformer
    assert not hasattr(model, "vitmerge")


def test_decreasing_schedule_and_source_tracking():
    model = make("vit")
    vitmerge.apply(model, r=(4, -1.0), trace_source=True)
    assert model.vitmerge.r == [8, 5, 2, 0]  # ToMe inflection schedule: from 2r down to 0
    with torch.no_grad():
        model(images(model, b=3))
    src = last_source(model)
    n = model.vitmerge.tokens_out[-1]
    assert src.shape == (3, n, 17)
    assert torch.equal(src.sum(1), torch.ones(3, 17))  # every patch in exactly one final token
    assert torch.equal(src[:, 0, 0], torch.ones(3))  # class token alone in its own slot
    assert torch.equal(src[:, 0].sum(-1), torch.ones(3))


def test_bad_requests():
    with pytest.raises(ScheduleError, match="too large.*r <= 8"):
        vitmerge.apply(make("vit"), r=9)
    with pytest.raises(ScheduleError, match="one r per block"):
        vitmerge.apply(make("vit"), r=[1, 2])
    with pytest.raises(ScheduleError, match=">= 0"):
        vitmerge.apply(make("vit"), r=-1)
    with pytest.raises(ScheduleError, match="unknown merge method"):
        vitmerge.apply(make("vit"), method="magic")
    with pytest.raises(UnsupportedModelError, match="Supported"):
        vitmerge.apply(timm.create_model("resnet18", pretrained=False, num_classes=3))
    with pytest.raises(UnsupportedModelError, match="not a timm VisionTransformer"):
        vitmerge.apply(torch.nn.Linear(3, 3))
