"""vitmerge.apply on transformers classifiers (ViT, DeiT, VideoMAE, AST) against the unpatched model and a
hand-written float64 ToMe on the transformers modules."""
import pytest
import torch

pytest.importorskip("transformers")

import vitmerge  # noqa: E402
from vitmerge.errors import ScheduleError, UnsupportedModelError  # noqa: E402
from vitmerge.models import input_shape, num_tokens  # noqa: E402
from vitmerge.models.budget import schedule_flops, solve_budget  # noqa: E402
from vitmerge.models.flops import count_flops  # noqa: E402

from support.hf_models import KINDS, inputs, make  # noqa: E402
from support.reference_tome_hf import protected_tokens, tome_forward  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", KINDS)
def test_r0_equals_unpatched(kind, attn):
    model = make(kind, attn=attn)
    x = inputs(model)
    with torch.no_grad():
        ref = model(x).logits
        vitmerge.apply(model, r=0)
        out = model(x).logits
    assert torch.equal(out, ref)


@pytest.mark.parametrize("prop_attn", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_handwritten_tome(kind, prop_attn):
    model = make(kind, attn="eager").double()
    x = inputs(model).double()
    rs = [5, 3]
    ref = tome_forward(model, x, rs, prop_attn=prop_attn)
    vitmerge.apply(model, r=rs, prop_attn=prop_attn)
    with torch.no_grad():
        out = model(x).logits
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["videomae", "ast"])
def test_sdpa_and_eager_agree_when_merging(kind):
    x = inputs(make(kind))
    outs = []
    for attn in ("sdpa", "eager"):
        model = make(kind, attn=attn)
        vitmerge.apply(model, r=[6, 4])
        with torch.no_grad():
            outs.append(model(x).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_token_schedule_is_what_runs_and_prefix_tokens():
    model = make("ast")
    vitmerge.apply(model, r=[9, 9])
    info = model.vitmerge
    seen = []
    from vitmerge.models.hf import layers

    for layer in layers(model):
        layer.layernorm_after.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    with torch.no_grad():
        model(inputs(model))
    assert num_tokens(model) == 26 and info.protected == 2  # 4 x 6 patches + class + distillation
    assert info.tokens == [(26, 9, 17), (17, 7, 10)]  # one ToMe step removes at most half the unprotected
    assert seen == info.tokens_out
    assert [protected_tokens(make(k)) for k in KINDS] == [vitmerge.apply(make(k), r=0).vitmerge.protected
                                                           for k in KINDS]


def test_video_merging_is_spatiotemporal():
    """Tokens of any frame may merge: in a static video (and no position embedding) the tubelets of one
    place at the two time steps are identical, and hash merges exactly those pairs across time."""
    model = make("videomae")
    model.videomae.embeddings.position_embeddings.zero_()  # a fixed sin/cos table, not a parameter
    x = torch.randn(1, 1, 3, 32, 32).expand(1, 4, 3, 32, 32).contiguous()  # 4 equal frames: 2 equal tubelet planes
    vitmerge.apply(model, "hash", r=[16, 0], trace_source=True)
    with torch.no_grad():
        model(x)
    src = vitmerge.models.last_source(model)[0]  # [16, 32]: which tubelets each output token holds
    # tokens are (time, row, column) in order: place p is token p at t = 0 and token 16 + p at t = 1
    groups = sorted(tuple(torch.nonzero(row).flatten().tolist()) for row in src)
    assert groups == [(p, 16 + p) for p in range(16)]


def test_state_dict_unchanged_and_remove_restores():
    model = make("deit")
    cls = type(model)
    keys = list(model.state_dict())
    x = inputs(model)
    with torch.no_grad():
        ref = model(x).logits
        vitmerge.apply(model, "hash", r=6)
        assert list(model.state_dict()) == keys
        assert not torch.equal(model(x).logits, ref)
        vitmerge.remove(model)
        assert torch.equal(model(x).logits, ref)
    assert type(model) is cls and not hasattr(model, "vitmerge")


@pytest.mark.parametrize("method,kind", [("hash", "videomae"), ("hash", "ast"), ("importance", "vit"),
                                         ("importance", "ast")])
def test_other_block_methods_run(method, kind):
    model = make(kind)
    n = num_tokens(model) - protected_tokens(model)
    r = n - 4 if method == "hash" else n // 2
    vitmerge.apply(model, method, r=[r, 2])
    with torch.no_grad():
        out = model(inputs(model)).logits
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert model.vitmerge.tokens_out[-1] == num_tokens(model) - r - 2


def test_flop_budget_is_met_by_counted_flops():
    model = make("videomae")
    for method in ("tome", "hash"):
        rs = solve_budget(model, 0.8, method)
        analytic = schedule_flops(model, rs, method)
        base = count_flops(model)
        vitmerge.apply(model, method, r=rs)
        counted = count_flops(model)
        vitmerge.remove(model)
        # the analytic block model counts what FlopCounterMode counts, up to the merge's small ops
        assert abs(analytic - counted) / counted < 0.02, (method, analytic, counted)
        assert counted / base <= 0.8 + 0.01
    assert count_flops(make("videomae", attn="eager")) == count_flops(make("videomae", attn="sdpa"))


def test_unsupported_models_and_methods():
    import transformers as tf

    bert = tf.BertForSequenceClassification(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=64, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="BertForSequenceClassification.*Supported.*VideoMAEForVideo"):
        vitmerge.apply(bert, r=2)
    base = tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match="ViTModel is not one of the supported vit classes"):
        vitmerge.apply(base, r=2)
    for method in ("evo", "vwt"):
        with pytest.raises(UnsupportedModelError, match="timm ViTs only.*tome, hash, importance"):
            vitmerge.apply(make("ast"), method, r=2)
    with pytest.raises(UnsupportedModelError, match="no class token.*tome.*hash"):
        vitmerge.apply(make("videomae"), "importance", r=2)
    with pytest.raises(ScheduleError, match="too large.*r <= 12"):
        vitmerge.apply(make("ast"), "tome", r=13)  # 24 unprotected tokens: at most half in one step
    model = vitmerge.apply(make("vit"), r=2)
    with pytest.raises(ValueError, match="attention mask"):
        model(inputs(model), attention_mask=torch.ones(2, 17))


def test_input_shapes():
    assert [input_shape(make(k)) for k in ("vit", "videomae", "ast")] == [(3, 32, 32), (4, 3, 32, 32), (48, 32)]
