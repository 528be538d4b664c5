"""Tiny transformers classifiers (depth 2, width 32) for the tests: built from configs, never downloaded."""
from __future__ import annotations

import torch

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=5,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

KINDS = ("vit", "deit", "videomae", "videomae_token0", "ast")


def make(kind: str, seed: int = 0, attn: str = "sdpa", **overrides):
    """A tiny classifier of ``kind`` with random weights, in eval mode.

    vit: 16 patches + class token; deit (with teacher head): 16 + class + distillation;
    videomae: 4 frames (tubelet 2) of 32 x 32 in 8 x 8 patches = 32 tubelets, mean pooling;
    videomae_token0: the same without mean pooling (the head reads token 0);
    ast: 32 mel bins x 48 frames in 8 x 8 patches = 4 x 6 + class + distillation tokens.
    """
    import transformers as tf

    torch.manual_seed(seed)
    kw = {**COMMON, **overrides}
    if kind == "vit":
        m = tf.ViTForImageClassification(tf.ViTConfig(image_size=32, patch_size=8, **kw))
    elif kind == "deit":
        m = tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(image_size=32, patch_size=8, **kw))
    elif kind in ("videomae", "videomae_token0"):
        m = tf.VideoMAEForVideoClassification(tf.VideoMAEConfig(
            image_size=32, patch_size=8, num_frames=4, tubelet_size=2, use_mean_pooling=kind == "videomae", **kw))
    elif kind == "ast":
        m = tf.ASTForAudioClassification(tf.ASTConfig(num_mel_bins=32, max_length=48, patch_size=8, frequency_stride=8,
                                                      time_stride=8, **kw))
    else:
        raise ValueError(kind)
    m.set_attn_implementation(attn)
    with torch.no_grad():  # non-zero class / distillation tokens and positions (some models start them at 0)
        emb = m.base_model.embeddings
        for name in ("cls_token", "distillation_token", "position_embeddings"):
            p = getattr(emb, name, None)
            if isinstance(p, torch.nn.Parameter):
                p.normal_(0, 0.5)
    return m.eval()


def inputs(model, batch: int = 2, seed: int = 1) -> torch.Tensor:
    from vitmerge.models import input_shape

    return torch.randn(batch, *input_shape(model), generator=torch.Generator().manual_seed(seed))
