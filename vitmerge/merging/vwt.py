"""Visual-Word Tokenizer (VWT, arXiv 2411.15397), static-shape form.

VWT groups patches *before* the encoder (after patch embedding + position embedding), so every block
runs on fewer tokens. It needs no training. Two ways to decide what groups, both on per-patch
features ``f [B, P, F]``: the raw pixel patch (the paper's choice, ``space="pixels"``) or the patch
embedding before the position embedding (``space="embeddings"``).

* ``inter`` (the paper's inter-image approach): a vocabulary of visual words (spherical k-means
  centroids of features over a calibration set, ``vitmerge vocab build``) assigns every patch to
  its most cosine-similar word. Patches of the same word in an image form one group.
* ``intra`` (within the image only, no vocabulary): the paper drops the lowest pixel-variance
  patches; here they *merge* into their most similar kept patch instead, so nothing is thrown away
  and the group sizes feed proportional attention.

Static count. The paper's output length depends on the image (one token per word present, plus the
unmatched patches) and is padded per batch. Here the caller fixes ``r`` (patches removed), so the
output has ``protected + P - r`` tokens whatever the image:

* every patch gets a removal rank. ``inter``: patches whose word already has a better-matching
  patch in the image (its *leader*) go first, most word-like first; then the leaders, most
  word-like first. ``intra``: lowest pixel variance first.
* the ``r`` first-ranked patches merge away, each into the kept patch of the same word (``inter``)
  or else the most cosine-similar kept patch (similarity quantised to 1/512, ties to the lower
  index). Destinations are always kept patches: no chains.

So when an image holds more distinct words than ``P - r``, the least word-like leaders also fold
into their nearest kept patch; when it holds fewer, some words keep more than one token.

Ranks are exact integers carried in float32 (feature score quantised to ``levels`` steps, ties
broken by patch index), so PyTorch, ONNX Runtime and TensorRT pick the same patches even where
patches are identical (flat background), where a float sort's tie order is unspecified.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import DataError, ScheduleError
from .base import MergePlan, identity_plan
from .spec import MethodSpec, Setup, SetupContext, clamp
from .topk import topk

SPACES = ("pixels", "embeddings")
MODES = ("inter", "intra")
SAME_WORD_BONUS = 4.0  # added to cosine similarity (in [-1, 1]) for a kept patch of the same word
MAX_EXACT = 2 ** 24  # float32 holds every integer below this exactly


def max_r(n_tokens: int, protected: int) -> int:
    return max(n_tokens - protected - 1, 0)


def check_options(mode: str = "inter", vocab=None, space=None, thresh=None) -> None:
    if mode not in MODES:
        raise ScheduleError(f"unknown vwt mode {mode!r}; use one of {', '.join(MODES)}")
    if space is not None and space not in SPACES:
        raise ScheduleError(f"unknown vwt space {space!r}; use one of {', '.join(SPACES)}")
    if thresh is not None and (isinstance(thresh, bool) or not isinstance(thresh, (int, float)) or not 0 <= thresh <= 2):
        raise ScheduleError(f"thresh is a cosine distance in [0, 2], got {thresh!r}")


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------

def pixel_patches(images: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """[B, C, H, W] -> [B, P, C * ph * pw] non-overlapping patches, row-major over the patch grid
    (the order of a stride-``patch`` convolution's output, i.e. of the patch tokens)."""
    B, C, H, W = images.shape
    ph, pw = patch_size
    gh, gw = H // ph, W // pw
    x = images[:, :, : gh * ph, : gw * pw].reshape(B, C, gh, ph, gw, pw)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * ph * pw)


# ----------------------------------------------------------------------------------------------
# Visual words (the vocabulary itself is data: vitmerge.models.vocabulary)
# ----------------------------------------------------------------------------------------------

def spherical_kmeans(
    x: torch.Tensor, k: int, iters: int = 30, seed: int = 0, chunk: int = 65536, progress=None
) -> torch.Tensor:
    """k unit-norm centroids of the rows of x [M, F] under cosine similarity (k-means++ seeding,
    Lloyd iterations; an emptied cluster is re-seeded with the worst-served point). Deterministic
    for a given seed. ``progress(i)`` is called after every iteration."""
    x = F.normalize(x.float(), dim=-1)
    M = x.shape[0]
    if M < k:
        raise DataError(f"{M} patches cannot make {k} visual words: use more images or fewer --words")
    gen = torch.Generator().manual_seed(seed)

    def best(c):  # (similarity to the nearest centroid, its index) for every row, in chunks
        sims, idx = [], []
        for s in range(0, M, chunk):
            v, i = (x[s : s + chunk] @ c.T).max(dim=-1)
            sims.append(v)
            idx.append(i)
        return torch.cat(sims), torch.cat(idx)

    # k-means++: each new centre drawn with probability proportional to its distance (1 - cos).
    cent = x[torch.randint(M, (1,), generator=gen)]
    d = (1.0 - (x @ cent.T)[:, 0]).clamp_min(0)
    for _ in range(1, k):
        p = d.double() if float(d.sum()) > 0 else torch.ones(M, dtype=torch.float64)
        j = torch.multinomial(p / p.sum(), 1, generator=gen)
        cent = torch.cat([cent, x[j]])
        d = torch.minimum(d, (1.0 - (x @ x[j].T)[:, 0]).clamp_min(0))
    for it in range(iters):
        sim, lab = best(cent)
        sums = torch.zeros_like(cent).index_add_(0, lab, x)
        counts = torch.bincount(lab, minlength=k)
        new = F.normalize(sums, dim=-1)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            worst = sim.argsort()[: len(empty)]
            new[empty] = x[worst]
        moved = float((1.0 - (new * cent).sum(-1)).max())
        cent = new
        if progress is not None:
            progress(it)
        if moved < 1e-6 and not len(empty):
            break
    return cent


# ----------------------------------------------------------------------------------------------
# The grouping step
# ----------------------------------------------------------------------------------------------

def quant_levels(n_patches: int, tiers: int = 2) -> int:
    """Steps of the quantised score such that (tier, score, index) packs below 2**24."""
    levels = min(1024, MAX_EXACT // (tiers * n_patches) - 2)
    if levels < 8:
        raise ScheduleError(f"vwt supports at most {MAX_EXACT // (tiers * 10)} patches per image, got {n_patches}")
    return levels


def dst_levels(n_keep: int) -> int:
    """Steps per unit of the quantised destination score (range 0 .. 2 + bonus) for exact keys."""
    return max(1, min(512, (MAX_EXACT // n_keep - 1) // int(2 + SAME_WORD_BONUS)))


def _rank(tier: torch.Tensor, score01: torch.Tensor, levels: int) -> torch.Tensor:
    """Exact, unique float32 ranks (larger = earlier): tier, then score quantised to ``levels``
    steps, then lower patch index. tier [B, P] in {0, 1}, score01 [B, P] in [0, 1]."""
    P = score01.shape[1]
    q = torch.round(score01.clamp(0.0, 1.0) * levels)
    idx = torch.arange(P - 1, -1, -1, device=score01.device, dtype=score01.dtype)
    return (tier * (levels + 1) + q) * P + idx


def group_plan(
    features: torch.Tensor,
    r: int,
    protected: int,
    rank: torch.Tensor,
    words: Optional[torch.Tensor] = None,
) -> MergePlan:
    """Merge the ``r`` highest-ranked patches into kept patches.

    features [B, P, F] per-patch features (patch tokens only, in token order); rank [B, P] unique
    removal ranks (larger merges first); words [B, P] optional visual-word index of each patch: a
    removed patch joins a kept patch of its own word when there is one, else its most
    cosine-similar kept patch. The plan is over the full sequence of ``protected + P`` tokens.
    """
    B, P, _ = features.shape
    N = protected + P
    r = clamp(r, max_r(N, protected))
    if r <= 0:
        return identity_plan(features.new_zeros(B, N, 1))
    n_keep = P - r
    dev = features.device
    with torch.no_grad():
        # ranks are distinct exact integers; merging.topk sorts long rows in chunks below TensorRT's limit
        order = topk(rank, P, largest=True, unique=True).indices
        src = order[:, :r]
        kept = topk(order[:, r:], n_keep, largest=False, unique=True).values
        unit = F.normalize(features.float(), dim=-1)
        Fd = unit.shape[-1]
        u_src = unit.gather(1, src[..., None].expand(B, r, Fd))
        u_keep = unit.gather(1, kept[..., None].expand(B, n_keep, Fd))
        score = u_src @ u_keep.transpose(-1, -2)  # [B, r, n_keep] cosine similarity
        if words is not None:
            same = words.gather(1, src)[..., None] == words.gather(1, kept)[:, None, :]
            score = score + SAME_WORD_BONUS * same.to(score.dtype)
        # Identical kept patches tie exactly in exact arithmetic, but GEMM kernels may round their
        # columns differently: quantise, then take the lowest kept index among the best.
        steps = dst_levels(n_keep)
        q = torch.round((score + 1.0).clamp(0.0, 2.0 + SAME_WORD_BONUS) * steps)
        pos = torch.arange(n_keep - 1, -1, -1, device=dev, dtype=q.dtype)
        dst = protected + (q * n_keep + pos).argmax(dim=-1)
        keep = torch.cat([torch.arange(protected, device=dev).expand(B, protected), protected + kept], dim=-1)
    return MergePlan(keep=keep, src=protected + src, dst=dst)


def inter_rank(features: torch.Tensor, centroids: torch.Tensor, thresh: Optional[float] = None):
    """Visual-word assignment and removal ranks. features [B, P, F], centroids [V, F] unit-norm.

    Returns (rank [B, P], words [B, P]). A patch whose cosine distance to its word exceeds
    ``thresh`` (the paper's matching threshold; None = no threshold) counts as unmatched: it is
    ranked with the leaders, so it stays unless the budget needs it.
    """
    B, P, _ = features.shape
    unit = F.normalize(features.float(), dim=-1)
    sim, words = (unit @ centroids.T.to(unit.dtype)).max(dim=-1)  # [B, P]
    levels = quant_levels(P)
    q = torch.round(((sim + 1.0) * 0.5).clamp(0.0, 1.0) * levels)
    # Leader of a word in this image: its best-matching patch (ties -> lower index), found with a
    # one-hot max over patches (exact integers, so the equality test below is exact too).
    key = q * P + torch.arange(P - 1, -1, -1, device=unit.device, dtype=unit.dtype) + 1.0  # unique, > 0
    vocab_ids = torch.arange(centroids.shape[0], device=unit.device)
    onehot = (words[..., None] == vocab_ids).to(unit.dtype)  # [B, P, V]
    best_of_word = (onehot * key[..., None]).amax(dim=1)  # [B, V]
    leader = best_of_word.gather(1, words) == key
    tier = (~leader).to(unit.dtype)
    if thresh is not None:
        tier = tier * ((1.0 - sim) <= thresh).to(unit.dtype)
    return _rank(tier, (sim + 1.0) * 0.5, levels), words


def intra_rank(pixel_feats: torch.Tensor) -> torch.Tensor:
    """Lowest pixel variance merges first (the paper's intra-image criterion)."""
    var = pixel_feats.float().var(dim=-1)  # [B, P]
    P = var.shape[1]
    levels = quant_levels(P)
    score = 1.0 - var / var.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return _rank(torch.zeros_like(score), score, levels)


def vwt_plan(
    metric: torch.Tensor,
    r: int,
    protected: int = 1,
    mode: str = "inter",
    centroids: Optional[torch.Tensor] = None,
    pixels: Optional[torch.Tensor] = None,
    thresh: Optional[float] = None,
) -> MergePlan:
    """One VWT grouping as a plan over ``protected + P`` tokens.

    metric [B, P, F]: the per-patch features words are matched in (pixels or embeddings);
    pixels [B, P, C*ph*pw]: raw pixel patches for the ``intra`` variance ranking (defaults to metric).
    """
    if mode == "inter":
        if centroids is None:
            raise ScheduleError("vwt mode 'inter' needs a vocabulary (centroids); build one with `vitmerge vocab build`")
        if centroids.shape[-1] != metric.shape[-1]:
            raise ScheduleError(f"vocabulary words have {centroids.shape[-1]} features but the patches have {metric.shape[-1]}")
        rank, words = inter_rank(metric, centroids, thresh)
    elif mode == "intra":
        rank, words = intra_rank(metric if pixels is None else pixels), None
    else:
        raise ScheduleError(f"unknown vwt mode {mode!r}; use one of {', '.join(MODES)}")
    return group_plan(metric, r, protected, rank, words)


def group(images: torch.Tensor, emb: torch.Tensor, r: int, protected: int, mode: str, space: str,
          patch_size: tuple, thresh: Optional[float] = None, centroids: Optional[torch.Tensor] = None) -> MergePlan:
    """The pre-encoder step: images [B, C, H, W] and patch embeddings [B, P, D] (before the position
    embedding) -> one grouping plan over ``protected + P`` tokens (features chosen by ``space``).
    Features are taken in at least float32 (only those used: no stray casts in exported graphs)."""
    pixels = pixel_patches(_f32(images), patch_size) if (space == "pixels" or mode == "intra") else None
    feats = pixels if space == "pixels" else _f32(emb)
    return vwt_plan(feats, r, protected, mode=mode, centroids=_f32(centroids), pixels=pixels, thresh=thresh)


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.to(torch.promote_types(t.dtype, torch.float32))


DEFAULT_OPTIONS = {"mode": "inter", "vocab": None, "space": None, "thresh": None}


def setup(options, ctx: SetupContext) -> Setup:
    """Resolve the vocabulary (``inter``) or the feature space (``intra``) for one model."""
    opts = {**DEFAULT_OPTIONS, **options}  # names and values validated by check_options
    mode, vocab, space, thresh = opts["mode"], opts["vocab"], opts["space"], opts["thresh"]
    centroids = None
    if mode == "inter":
        if vocab is None:
            raise ScheduleError(
                "vwt mode inter needs a vocabulary of visual words: build one with "
                "`vitmerge vocab build MODEL --data DATA_DIR -o vocab.pt` and give it with -O vocab=vocab.pt "
                "(in Python: vitmerge.apply(model, 'vwt', r, vocab='vocab.pt')), or use -O mode=intra, which needs none"
            )
        voc = ctx.load("vocab", vocab, space=space)  # a vocabulary checked against the model
        space = voc.space
        centroids = voc.centroids.clone()
    else:
        space = space or "pixels"
    quant_levels(ctx.n_tokens - ctx.protected)  # fails early for images with more patches than the exact ranks allow
    info = {"mode": mode, "space": space}
    if mode == "inter":
        info.update(words=int(centroids.shape[0]),
                    vocab=str(vocab) if isinstance(vocab, (str, os.PathLike)) else "<in memory>")
    if thresh is not None:
        info["thresh"] = float(thresh)
    step = {"mode": mode, "space": space, "patch_size": tuple(int(v) for v in ctx.patch_size),
            "thresh": None if thresh is None else float(thresh)}
    return Setup(plan_options={}, info=info, step_options=step, buffers={"centroids": centroids})


SPEC = MethodSpec(
    name="vwt",
    plan=vwt_plan,  # metric: per-patch features [B, P, F] (no protected rows); plan over protected + P tokens
    max_r=max_r,
    summary="Visual-word tokenizer: patches grouped once before the encoder (inter: vocabulary, intra: none)",
    form="pre_encoder",  # runs once before the blocks, not in them
    options=DEFAULT_OPTIONS,
    validate=check_options,
    setup=setup,
    resources={"vocab": "vocabulary"},
    group=group,
    selftest_options={"mode": "intra"},  # inter needs a vocabulary file
)


__all__ = [
    "spherical_kmeans", "pixel_patches",
    "vwt_plan", "group_plan", "group", "setup", "inter_rank", "intra_rank", "max_r", "check_options", "SPEC", "SPACES", "MODES",
]
