"""The transformers model types as a table (vitmerge.models.hf_table): every record is exercised on a real
(tiny) model, its answers are what the model does, and the family forwards every question to hf."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from vitmerge.models import hf  # noqa: E402
from vitmerge.models.family import QUESTIONS, TRANSFORMERS, Family, HFFamily, family  # noqa: E402
from vitmerge.models.hf_table import TYPES  # noqa: E402

from support.hf_models import KINDS, inputs, make  # noqa: E402
from support.reference_yolos import make_yolos  # noqa: E402


def _models():
    for kind in KINDS:
        yield kind, make(kind)
    for mid in (False, True):
        yield f"yolos{'-mid' if mid else ''}", make_yolos(mid)


MODELS = dict(_models())


def test_every_model_type_of_the_table_is_exercised():
    """A record no test model reaches would be an untested branch: each model type has a tiny model here."""
    built = {hf.model_type(m) for m in MODELS.values()}
    assert built == set(TYPES)
    for m in MODELS.values():
        assert type(m).__name__ in TYPES[hf.model_type(m)].classes
        assert hf.unsupported_reason(m) is None


@pytest.mark.parametrize("name", sorted(MODELS))
def test_table_answers_are_what_the_model_does(name):
    """num_tokens: the sequence entering layer 0; input_shape: what the model takes; detection tokens: the
    boxes it returns; output names: one per output tensor."""
    model = MODELS[name]
    seen = []
    hook = hf.layers(model)[0].register_forward_pre_hook(lambda mod, args, kwargs: seen.append(
        (args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(inputs(model, batch=1))
    finally:
        hook.remove()
    assert seen == [hf.num_tokens(model)]
    tensors = hf.outputs(model, out)
    assert len(tensors) == len(hf.output_names(model))
    if hf.detection_tokens(model):
        assert tensors[1].shape[1] == hf.detection_tokens(model)
        assert hf.prefix_tokens(model) == 1 + hf.detection_tokens(model)
    assert 0 <= hf.prefix_tokens(model) < hf.num_tokens(model)
    assert hf.modality(model) == {3: "image", 4: "video", 2: "audio"}[len(hf.input_shape(model))]


def test_the_family_answers_every_question_through_hf():
    """HFFamily has no forwarding method of its own: each Family method is read off hf (layers = blocks)."""
    public = {n for n in vars(Family) if not n.startswith("_") and callable(getattr(Family, n))}
    assert public == set(QUESTIONS) | {"patch"}
    for q in QUESTIONS:
        assert q in vars(HFFamily), q
    model = MODELS["vit"]
    assert family(model) is TRANSFORMERS
    assert TRANSFORMERS.blocks(model) == hf.layers(model)
    assert TRANSFORMERS.num_tokens(model) == hf.num_tokens(model)
    assert HFFamily.blocks.__name__ == "blocks"
