"""Detection: the position map of a merged model (unmerge), the dense detector, YOLOS; exported with
two outputs and checked in ONNX Runtime."""
import pytest
import torch

import vitmerge
from vitmerge.models.apply import apply


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _tiny_vit(seed: int = 0, img: int = 64):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img, num_classes=5, depth=3).eval()


def _unmerge_by_source(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Reference: loop over ToMe's merge_source map [B, n, N0] (0/1): position j takes the token holding it."""
    B, n, N0 = source.shape
    out = torch.empty(B, N0, x.shape[-1], dtype=x.dtype)
    for b in range(B):
        for j in range(N0):
            holders = [i for i in range(n) if source[b, i, j] > 0]
            assert len(holders) == 1, f"position {j} is held by {holders}"
            out[b, j] = x[b, holders[0]]
    return out


@pytest.mark.parametrize("method,r,opts", [("tome", [6, 5, 4], {}), ("hash", [10, 6, 3], {}),
                                           ("importance", [5, 5, 5], {}), ("vwt", 9, {"mode": "intra"})])
def test_positions_unmerge_is_the_merge_source_inverse(method, r, opts):
    """MergeState.track_positions composes every step's assignment; unmerge gathers the final tokens back to
    all N0 positions, equal to the loop over the (independently tracked) merge_source map."""
    model = apply(_tiny_vit(), method, r, trace_source=True, **opts)
    model._vm_state.track_positions = True
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model._vm_state.reset()
        feats = model.forward_features(x)
    st = model._vm_state
    n0 = 16 + 1
    assert feats.shape[1] < n0 and st.positions.shape == (2, n0)
    torch.testing.assert_close(st.unmerge(feats), _unmerge_by_source(feats, st.source), rtol=0, atol=0)
    assert torch.equal(st.positions[:, 0], torch.zeros(2, dtype=torch.long))  # the class token stays token 0


def test_positions_slow_fast_keeps_every_token():
    """evo hands all N tokens on (its split is not a reduction): no position map, unmerge is the identity."""
    model = apply(_tiny_vit(), "evo", 4)
    model._vm_state.track_positions = True
    with torch.no_grad():
        model._vm_state.reset()
        feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert model._vm_state.positions is None and torch.equal(model._vm_state.unmerge(feats), feats)


def test_unmerge_without_tracking_is_refused():
    model = apply(_tiny_vit(), "tome", 4)
    with pytest.raises(RuntimeError, match="track_positions"):
        model._vm_state.unmerge(torch.zeros(1, 5, 192))
