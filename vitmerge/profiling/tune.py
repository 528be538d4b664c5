"""``vitmerge tune``: the fastest merged model within an accuracy budget, measured on the target runtime.

What a deployment engineer asks is "the fastest file that loses at most P top-1 (or mAP) points on my data, on my
runtime, at my batch size". :func:`tune` answers it in one call:

1. :func:`measure_block_latency`: one (unmerged) block of the model timed on ``[B, N, C]`` inputs for a range of
   token counts N, on the named runtime at the named batch (torch: the module itself; ort / ort-cuda: the block
   exported to ONNX with a dynamic token axis, checked against PyTorch, timed in an ONNX Runtime session), the
   medians of interleaved rounds. Written as the JSON ``--budget-latency`` reads: reusable by export / eval.
2. Candidates: every method that merges inside the blocks and that the model's family takes (the registry's
   ``block`` form; or ``methods``) x latency budgets (solved by ``solve_budget_latency`` from that table) and
   FLOP budgets; each a :class:`~vitmerge.request.MergeRequest`. Budgets that resolve to the same per-block r
   for one method are one candidate.
3. Each candidate is merged (:func:`vitmerge.models.build.merge`), exported and verified (ort runtimes; torch:
   run in PyTorch), scored on the same held-out images as the unmerged model (``limit``) by eval's own
   :func:`~.compare.score` (classifiers: top-1 and top-1 agreement; detectors: mAP@[.5:.95] on a COCO folder and
   mAP@0.5 against the unmerged model's detections), and timed on
   the runtime interleaved with the unmerged model (:func:`~.profile.profile_targets`: the speed-up of each
   candidate is against the baseline measured in the same rounds).
4. The accuracy-latency Pareto front (:func:`~.plots.pareto_front`) and the choice for the target
   (:class:`Target`): ``max_drop`` (fastest within P points), ``target_ms`` (most accurate at or under X ms),
   ``target_speedup`` (most accurate at or over S x). No candidate meets it: :class:`TargetNotMet`, naming the
   best found (the report is written all the same).
5. Everything measured is cached per candidate (one JSON each, plus its exported file) under a folder keyed by
   the model (reference, checkpoint hash or size + mtime, kwargs), the data, the runtime, the batch, the limit
   and the measurement settings: an interrupted run resumes, a second run measures nothing.

This module's top level imports no torch: the CLI checks arguments (``Target``, runtimes) before loading it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .._io import atomic_write
from ..errors import DataError, RuntimeMissingError, UsageError
from ..request import MergeRequest

log = logging.getLogger(__name__)

#: the runtimes tune measures on (TensorRT is refused: build the chosen ONNX file into an engine afterwards)
TUNE_RUNTIMES = ("torch", "ort", "ort-cuda")
#: latency budgets tried by default (fractions of the unmerged model's modelled block latency)
DEFAULT_BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5)
#: token counts of the block latency table, as fractions of the model's token count
TOKEN_FRACTIONS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125)
TABLE_NAME = "block_latency.json"
CACHE_VERSION = 2  # 2: detectors; Candidate.top1/agreement became score/fidelity


def default_cache_dir() -> Path:
    """``$VITMERGE_CACHE/tune`` (default: ``<tmp>/vitmerge-cache/tune``), beside the demo's models."""
    from .._io import cache_root

    return cache_root() / "tune"


# ------------------------------------------------------------------------------------------- the target


@dataclass(frozen=True)
class Target:
    """What the chosen model must meet: ``max_drop`` (points of the model's metric lost vs unmerged, at most:
    top-1 for classifiers, mAP for detectors), ``target_ms`` (p50 latency, at most) or ``target_speedup`` (p50
    speed-up over unmerged, at least). ``metric`` names the metric in messages (:func:`tune` sets it)."""

    kind: str
    value: float
    metric: str = "top-1"

    KINDS = ("max_drop", "target_ms", "target_speedup")
    OPTION = {"max_drop": "--max-drop", "target_ms": "--target-ms", "target_speedup": "--target-speedup"}

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise UsageError(f"unknown target {self.kind!r}; one of {', '.join(self.KINDS)}")
        v = float(self.value)
        if not math.isfinite(v) or (v < 0 if self.kind == "max_drop" else v <= 0):
            need = f">= 0 ({self.metric} points)" if self.kind == "max_drop" else "> 0"
            raise UsageError(f"{self.OPTION[self.kind]} must be {need}, got {self.value!r}")
        object.__setattr__(self, "value", v)

    @classmethod
    def from_options(cls, max_drop: Optional[float] = None, target_ms: Optional[float] = None,
                     target_speedup: Optional[float] = None) -> "Target":
        """Exactly one of the three (the CLI's options); anything else is a :class:`UsageError`."""
        given = {k: v for k, v in (("max_drop", max_drop), ("target_ms", target_ms),
                                   ("target_speedup", target_speedup)) if v is not None}
        if len(given) != 1:
            named = ", ".join(cls.OPTION[k] for k in given) if given else "none"
            raise UsageError("give exactly one target: --max-drop P (top-1 or mAP points lost at most), --target-ms X "
                             f"(p50 latency at most) or --target-speedup S (speed-up at least); got {named}")
        (kind, v), = given.items()
        return cls(kind, v)

    def describe(self) -> str:
        if self.kind == "max_drop":
            return f"{self.metric} drop <= {self.value:g} points"
        if self.kind == "target_ms":
            return f"p50 latency <= {self.value:g} ms"
        return f"speed-up >= {self.value:g}x"

    def meets(self, c: "Candidate", baseline: "Candidate") -> bool:
        if self.kind == "max_drop":
            return c.drop(baseline) <= self.value + 1e-9
        if self.kind == "target_ms":
            return c.p50_ms <= self.value
        return c.speedup >= self.value

    def choose(self, candidates: Sequence["Candidate"], baseline: "Candidate") -> Optional["Candidate"]:
        """The fastest candidate within the drop (largest speed-up), or the most accurate one within the latency /
        speed-up
        (:func:`tune` passes the unmerged model among them: when no merged model that meets the target is faster,
        the answer is the unmerged one)."""
        ok = [c for c in candidates if self.meets(c, baseline)]
        if not ok:
            return None
        if self.kind == "max_drop":  # fastest = the largest speed-up over the unmerged model timed in the same
            return max(ok, key=lambda c: (c.speedup, c.score))  # rounds: robust to load drift between candidates
        return max(ok, key=lambda c: (c.score, -c.p50_ms))

    def best_found(self, candidates: Sequence["Candidate"], baseline: "Candidate") -> Optional["Candidate"]:
        """The candidate closest to the target (least drop; fastest; largest speed-up)."""
        if not candidates:
            return None
        if self.kind == "max_drop":
            return min(candidates, key=lambda c: (c.drop(baseline), c.p50_ms))
        if self.kind == "target_ms":
            return min(candidates, key=lambda c: (c.p50_ms, -c.score))
        return max(candidates, key=lambda c: (c.speedup, c.score))


class TargetNotMet(UsageError):
    """No candidate meets the target; ``result`` holds everything measured (``best``: the closest one)."""

    def __init__(self, message: str, result: "TuneResult"):
        super().__init__(message)
        self.result = result


def check_runtime(runtime: str) -> None:
    """A :class:`RuntimeMissingError` when this machine lacks ``runtime`` (checked before minutes of work), a
    :class:`UsageError` for a runtime tune does not measure."""
    from ..backends.base import RUNTIMES

    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; tune measures on {', '.join(TUNE_RUNTIMES)}")
    if runtime == "trt":
        from ..plugins.tensorrt_plugin import require_tensorrt

        require_tensorrt()  # missing here: RuntimeMissingError with the install line
        raise UsageError("vitmerge tune does not build TensorRT engines per candidate: tune with --runtime ort-cuda "
                         "(the same GPU), then build the chosen file with `vitmerge build`")
    if runtime in ("ort", "ort-cuda"):
        from ..backends.ort import cuda_problem, import_ort

        ort = import_ort()
        if runtime == "ort-cuda":
            problem = cuda_problem(ort)
            if problem:
                raise RuntimeMissingError(f"--runtime ort-cuda: ONNX Runtime CUDA is not available here: {problem}")


def check_settings(batch: int, rounds: int, iters: int, block_rounds: int, limit: Optional[int],
                   budgets: Sequence[float], flop_budgets: Sequence[float]) -> None:
    """A :class:`UsageError` for a count below 1 or a budget outside (0, 1] (torch-free: the CLI checks its
    options with it before torch loads; :func:`tune` again for library callers)."""
    for name, v in (("--batch", batch), ("--rounds", rounds), ("--iters", iters), ("--block-rounds", block_rounds)):
        if int(v) < 1:
            raise UsageError(f"{name} must be at least 1, got {v}")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    bad = [f for f in list(budgets) + list(flop_budgets) if not 0 < float(f) <= 1]
    if bad:
        raise UsageError(f"budgets are fractions of the unmerged model in (0, 1], got {bad}")
    if not budgets and not flop_budgets:
        raise UsageError("give at least one budget: --budgets and/or --flop-budgets")


# ------------------------------------------------------------------------------------------- block latency


def default_token_counts(n_tokens: int, protected: int = 1) -> List[int]:
    """The token counts of the latency table: the model's count and fractions of it down to an eighth."""
    low = max(protected + 1, 2)
    return sorted({max(low, int(round(n_tokens * f))) for f in TOKEN_FRACTIONS} | {n_tokens})


def monotone(table: Mapping[int, float]) -> Dict[int, float]:
    """The table made non-decreasing in the token count (pool-adjacent-violators: a count measured faster than a
    smaller one is noise; both become their mean), so the budget solver sees more tokens cost no less."""
    keys = sorted(table)
    blocks: List[List[float]] = []  # [sum, count]
    for k in keys:
        blocks.append([float(table[k]), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    out, i = {}, 0
    for s, c in blocks:
        for _ in range(int(c)):
            out[keys[i]] = s / c
            i += 1
    return out


def _block_and_shape(model):
    from ..models.family import family
    from ..models.shapes import num_tokens, prefix_tokens

    fam = family(model)
    blocks = fam.blocks(model)
    if not blocks:
        raise UsageError("the model has no transformer blocks to time")
    block = blocks[0]
    width = next((m.in_features for m in block.modules() if hasattr(m, "in_features")), None)
    if width is None:
        raise UsageError(f"cannot tell the token width of {type(block).__name__}")
    return block, int(width), num_tokens(model), prefix_tokens(model)


def _block_onnx(block, width: int, counts: Sequence[int], batch: int, folder: Path) -> Dict[int, Path]:
    """The block as ONNX: one file with a dynamic token axis when it exports and matches PyTorch at every count,
    else one static file per count. Returns {count: path}."""
    import contextlib
    import io
    import warnings

    import numpy as np
    import torch

    from ..backends.ort import session

    def export(n: Optional[int], path: Path) -> None:
        x = torch.randn(batch, n or max(counts), width)
        dyn = None if n else ({0: torch.export.Dim("batch", min=1, max=65536),
                               1: torch.export.Dim("tokens", min=2, max=65536)},)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(block, (x,), dynamo=True, dynamic_shapes=dyn, input_names=["x"],
                                     output_names=["y"], opset_version=18, verbose=False)
        prog.save(str(path))

    def matches(path: Path, ns: Sequence[int]) -> bool:
        sess = session(path)
        name = sess.get_inputs()[0].name
        for n in ns:
            x = torch.randn(batch, n, width, generator=torch.Generator().manual_seed(n))
            with torch.inference_mode():
                ref = block(x)
            ref = ref[0] if isinstance(ref, (tuple, list)) else ref
            got = sess.run(None, {name: x.numpy()})[0]
            if got.shape != tuple(ref.shape) or not np.allclose(got, ref.numpy(), atol=1e-3, rtol=1e-3):
                return False
        return True

    path = folder / "block_dynamic.onnx"
    try:
        export(None, path)
        if matches(path, counts):
            return {n: path for n in counts}
        log.info("the block's dynamic-token export does not match PyTorch at every count: one file per count")
    except Exception as e:  # a block that does not export with a symbolic token count
        log.info("the block does not export with a dynamic token count (%s): one file per count", e)
    out = {}
    for n in counts:
        p = folder / f"block_{n}.onnx"
        export(n, p)
        if not matches(p, [n]):
            raise UsageError(f"the block exported at {n} tokens does not match PyTorch in ONNX Runtime")
        out[n] = p
    return out


def measure_block_latency(model, runtime: str = "ort", batch: int = 1, token_counts: Optional[Sequence[int]] = None,
                          rounds: int = 5, iters: int = 5, warmup: int = 2, threads: int = 0,
                          output: Optional[Union[str, Path]] = None,
                          on_round: Optional[Callable[[], None]] = None) -> Dict[int, float]:
    """Latency (ms, median of interleaved rounds) of one unmerged block of ``model`` (a plain model or a
    :class:`~vitmerge.models.build.ModelSource`) on ``[batch, N, C]`` inputs, for each token count N
    (default :func:`default_token_counts`), in ``runtime``: torch (the module, on the CPU), ort / ort-cuda (the
    block exported to ONNX, checked against PyTorch, in an ONNX Runtime session). Every count is timed in turn
    each round, so drift hits all alike. ``output``: also write the table (made :func:`monotone`) as the JSON
    ``--budget-latency`` reads. Returns the measured (raw) table."""
    import copy

    import numpy as np
    import torch

    from .._io import scratch
    from .latency import interleaved

    if runtime not in TUNE_RUNTIMES:
        raise UsageError(f"block latency is measured on {', '.join(TUNE_RUNTIMES)}, not {runtime!r}")
    if batch < 1 or rounds < 1 or iters < 1 or warmup < 0:
        raise UsageError(f"need batch >= 1, rounds >= 1, iters >= 1, warmup >= 0 (got {batch}, {rounds}, {iters}, "
                         f"{warmup})")
    if hasattr(model, "build") and not isinstance(model, torch.nn.Module):
        model = model.build()
    block, width, n_tokens, protected = _block_and_shape(model)
    block = copy.deepcopy(block).eval()
    counts = sorted({int(n) for n in (token_counts or default_token_counts(n_tokens, protected))})
    if len(counts) < 2 or counts[0] < 1:
        raise UsageError(f"the latency table needs at least two token counts >= 1, got {counts}")
    fns: Dict[str, Callable[[], object]] = {}
    old_threads = torch.get_num_threads()
    with scratch("vitmerge-tune-block-") as tmp:
        if runtime == "torch":
            if threads:
                torch.set_num_threads(threads)  # restored below
            for n in counts:
                x = torch.randn(batch, n, width)

                def run(x=x):
                    with torch.inference_mode():
                        return block(x)
                fns[str(n)] = run
        else:
            from ..backends.ort import cuda_session, session

            files = _block_onnx(block, width, counts, batch, Path(tmp))
            sessions: Dict[Path, Any] = {}
            for n in counts:
                p = files[n]
                if p not in sessions:
                    sessions[p] = (cuda_session(p, threads, spinning=False) if runtime == "ort-cuda"
                                   else session(p, threads=threads, spinning=False))
                sess = sessions[p]
                x = np.random.default_rng(n).standard_normal((batch, n, width)).astype(np.float32)
                name = sess.get_inputs()[0].name
                if runtime == "ort-cuda":  # inputs and outputs bound on the GPU: host copies are not timed
                    from ..backends.ort import import_ort

                    binding = sess.io_binding()
                    x_dev = import_ort().OrtValue.ortvalue_from_numpy(x, "cuda", 0)
                    binding.bind_ortvalue_input(name, x_dev)
                    for o in sess.get_outputs():
                        binding.bind_output(o.name, "cuda", 0)
                    fns[str(n)] = lambda sess=sess, b=binding, keep=x_dev: sess.run_with_iobinding(b)
                else:
                    fns[str(n)] = lambda sess=sess, feed={name: x}: sess.run(None, feed)
        try:
            stats = interleaved(fns, rounds=rounds, iters=iters, warmup=warmup, progress=on_round)
        finally:
            torch.set_num_threads(old_threads)
    table = {n: float(stats[str(n)].p50) for n in counts}
    if output is not None:
        write_latency_table(table, output)
    return table


def write_latency_table(table: Mapping[int, float], path: Union[str, Path]) -> Path:
    """``{"tokens": ms}`` (made :func:`monotone`), the JSON ``--budget-latency`` reads."""
    text = json.dumps({str(k): round(v, 6) for k, v in sorted(monotone(table).items())}, indent=1) + "\n"
    return atomic_write(Path(path), text)


# ------------------------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    """One merged model (or the unmerged baseline, ``key`` "unmerged") and what was measured of it."""

    key: str
    label: str
    method: Optional[str]
    budgets: List[str]  # every budget that resolved to this schedule, e.g. ["latency 0.8", "flops 0.75"]
    r: List[int]
    request: Optional[Dict[str, Any]] = None  # the MergeRequest (to_dict) of its first budget
    tokens_out: Optional[List[int]] = None
    flops_fraction: Optional[float] = None
    flops: Optional[float] = None  # per image, counted by running the model
    score: float = float("nan")  # eval's metric, a fraction: top-1 (classifiers) or mAP@[.5:.95] (detectors)
    fidelity: float = float("nan")  # vs the unmerged model: top-1 agreement, or mAP@0.5 against its detections
    images: int = 0
    p50_ms: float = float("nan")
    p90_ms: float = float("nan")
    baseline_p50_ms: float = float("nan")  # the unmerged model in the same interleaved rounds
    speedup: float = float("nan")
    onnx: Optional[str] = None  # the exported, verified file in the cache (ort runtimes)
    verification: Optional[str] = None

    def drop(self, baseline: "Candidate") -> float:
        """Points of the metric lost against ``baseline`` (negative: gained)."""
        return (baseline.score - self.score) * 100

    def gain(self, baseline: "Candidate") -> float:
        """Points of the metric against ``baseline`` (printed with a sign; never -0.00)."""
        return (self.score - baseline.score) * 100 + 0.0

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Candidate":
        return cls(**{k: (float("nan") if v is None and k in _FLOATS else v) for k, v in d.items()
                      if k in cls.__dataclass_fields__})


_FLOATS = {"score", "fidelity", "p50_ms", "p90_ms", "baseline_p50_ms", "speedup"}


def default_methods(model) -> List[str]:
    """The registry's methods that merge inside the blocks (what the block latency table models), take no
    required option, and that the model's family implements."""
    from ..merging import METHODS
    from ..models.family import family

    forms = family(model).forms
    return [name for name, s in METHODS.items()
            if s.form == "block" and s.form in forms and all(v is not None for v in s.options.values())]


def _schedule_key(method: str, r, prop_attn: bool, options: Mapping[str, Any]) -> str:
    blob = json.dumps({"method": method, "r": r, "prop_attn": prop_attn,
                       "options": {k: str(v) for k, v in sorted(options.items())}}, sort_keys=True)
    return f"{method}-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


def plan_candidates(model, methods: Sequence[str], budgets: Sequence[float], flop_budgets: Sequence[float],
                    table_path: Optional[Path], prop_attn: bool = True,
                    options: Optional[Mapping[str, Mapping[str, Any]]] = None
                    ) -> Tuple[List[Candidate], List[Tuple[str, str]]]:
    """Candidates (each method x each latency budget, solved from the table at ``table_path``, and x each FLOP
    budget), one per distinct per-block schedule; and (label, reason) for the budgets that gave none."""
    from ..merging import method_spec
    from ..models.budget import resolve_schedule

    options = options or {}
    found: Dict[str, Candidate] = {}
    skipped: List[Tuple[str, str]] = []
    for method in methods:
        spec = method_spec(method)
        opts = dict(options.get(method, {}))
        plan = [("latency", f) for f in budgets] + [("flops", f) for f in flop_budgets]
        for kind, f in plan:
            label = f"{method} {kind} {f:g}"
            if kind == "latency" and spec.form != "block":
                skipped.append((label, f"the block latency table models merges inside the blocks; {method} is "
                                       f"{spec.form} (give it FLOP budgets)"))
                continue
            try:
                req = MergeRequest(method=method, budget=f, budget_latency=str(table_path) if kind == "latency"
                                   else None, prop_attn=prop_attn, options=opts)
                rs = resolve_schedule(model, method, None, "constant", req.budget, req.budget_latency, **opts)
            except Exception as e:  # an unreachable budget, a method this model does not take, ...
                from ..errors import VitmergeError

                if not isinstance(e, VitmergeError):
                    raise
                skipped.append((label, str(e)))
                continue
            r = [int(v) for v in rs] if isinstance(rs, (list, tuple)) else int(rs)
            if not any(r) if isinstance(r, list) else r == 0:
                skipped.append((label, "nothing to merge at this budget (r = 0 in every block)"))
                continue
            key = _schedule_key(method, r, prop_attn, opts)
            if key in found:
                found[key].budgets.append(f"{kind} {f:g}")
                continue
            found[key] = Candidate(key=key, label=label, method=method, budgets=[f"{kind} {f:g}"],
                                   r=r if isinstance(r, list) else [r], request=req.to_dict())
    return list(found.values()), skipped


def request_of(c: Candidate) -> MergeRequest:
    """The MergeRequest that builds candidate ``c``: its solved per-block r (the budget's answer, fixed)."""
    from ..merging import method_spec

    d = c.request or {}
    r = c.r[0] if method_spec(c.method).form == "pre_encoder" else list(c.r)  # vwt: one r before the encoder
    return MergeRequest(method=c.method, r=r, prop_attn=d.get("prop_attn", True), options=d.get("options") or {})


# ------------------------------------------------------------------------------------------- the cache


def _file_id(path: Optional[Path]) -> Optional[Dict[str, Any]]:
    """A checkpoint's identity: its sha256 (files up to 256 MB), else size + mtime."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        return {"path": str(p)}
    st = p.stat()
    if p.is_file() and st.st_size <= 256 << 20:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return {"sha256": h.hexdigest()}
    return {"path": str(p.resolve()), "size": st.st_size, "mtime": st.st_mtime}


def run_key(source, data: Path, runtime: str, batch: int, limit: Optional[int], settings: Mapping[str, Any]) -> str:
    """The cache folder's name: a hash of everything a measurement depends on (see the module docstring)."""
    from .._version import __version__

    blob = {"v": CACHE_VERSION, "vitmerge": __version__, "model": source.ref.spec,
            "checkpoint": _file_id(source.checkpoint), "kwargs": source.kwargs,
            "seed": None if source.checkpoint is not None else source.seed,
            "data": str(Path(data).expanduser().resolve()), "runtime": runtime, "batch": batch, "limit": limit,
            "settings": dict(settings)}
    text = json.dumps(blob, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Cache:
    """One folder per run key: ``block_latency.json``, ``baseline.json`` (+ ``baseline_logits.npy``), one
    ``<key>.json`` per measured candidate, ``<key>.onnx`` (+ ``<key>.export.json``: verified) per export."""

    def __init__(self, folder: Path):
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.dir / name

    def read(self, name: str) -> Optional[Dict[str, Any]]:
        p = self.dir / name
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    def write(self, name: str, data: Mapping[str, Any]) -> Path:
        from .report import to_jsonable

        return atomic_write(self.dir / name, json.dumps(to_jsonable(data), indent=1) + "\n")


# ------------------------------------------------------------------------------------------- the run


@dataclass
class TuneResult:
    settings: Dict[str, Any]
    target: Target
    table: Dict[int, float]  # as written (monotone)
    table_raw: Dict[int, float]  # as measured
    table_path: Path
    baseline: Candidate
    candidates: List[Candidate]
    skipped: List[Tuple[str, str]]
    front: List[str]  # keys of the Pareto front (baseline included), fastest first
    chosen: Optional[Candidate]
    best: Optional[Candidate]  # closest to the target when none meets it
    cache_dir: Path
    work: Dict[str, int] = field(default_factory=dict)  # what this run measured (0 everywhere: all from the cache)
    output: Optional[Path] = None
    report: Any = None  # ReportPaths

    @property
    def points(self) -> List[Candidate]:
        return [self.baseline] + self.candidates

    @property
    def metric(self) -> str:
        """What ``score`` is: "top-1" (classifiers) or "mAP" (detectors, mAP@[.5:.95])."""
        return self.target.metric

    @property
    def fidelity_name(self) -> str:
        return "agreement" if self.metric == "top-1" else "mAP@0.5 vs unmerged"

    def to_dict(self) -> Dict[str, Any]:
        return {
            "settings": self.settings, "target": {"kind": self.target.kind, "value": self.target.value,
                                                  "text": self.target.describe()},
            "block_latency_ms": {str(k): v for k, v in sorted(self.table.items())},
            "block_latency_measured_ms": {str(k): v for k, v in sorted(self.table_raw.items())},
            "baseline": self.baseline.to_dict(),
            "candidates": [dict(c.to_dict(), drop_points=c.drop(self.baseline), on_front=c.key in self.front,
                                meets_target=self.target.meets(c, self.baseline)) for c in self.candidates],
            "skipped": [{"label": a, "reason": b} for a, b in self.skipped],
            "pareto_front": self.front,
            "chosen": None if self.chosen is None else self.chosen.key,
            "best_found": None if self.best is None else self.best.key,
            "output": None if self.output is None else str(self.output),
            "cache": str(self.cache_dir), "work": self.work,
        }


class _Replay:
    """The unmerged model's outputs (``logits``; detectors also ``boxes``), recorded once by :class:`_Recorder`,
    handed back batch by batch in the order :func:`~.compare.score` asks: a runner that costs nothing."""

    def __init__(self, outputs: Mapping[str, Any]):
        self.arrays, self.at = dict(outputs), 0

    def outputs(self, x) -> Dict[str, Any]:
        import torch

        n = int(x.shape[0])
        out = {k: torch.from_numpy(v[self.at:self.at + n]) for k, v in self.arrays.items()}
        if any(v.shape[0] != n for v in out.values()):
            raise DataError("the data changed since the unmerged model was scored (clear the tune cache)")
        self.at += n
        return out

    def __call__(self, x):
        return self.outputs(x)["logits"]


class _Recorder:
    """A runner that keeps every output the wrapped one returned, batch by batch (:meth:`save`: one .npz)."""

    def __init__(self, runner):
        self.runner, self.parts = runner, {}

    def _keep(self, out: Mapping[str, Any]) -> None:
        for k, v in out.items():
            self.parts.setdefault(k, []).append(v.detach().cpu().float().numpy())

    def __call__(self, x):
        y = self.runner(x)
        self._keep({"logits": y})
        return y

    def outputs(self, x):
        out = self.runner.outputs(x)
        self._keep(out)
        return out

    def save(self, path: Path) -> Path:
        import io

        import numpy as np

        buf = io.BytesIO()
        np.savez(buf, **{k: np.concatenate(v) for k, v in self.parts.items()})
        return atomic_write(path, buf.getvalue())


def _front(points: Sequence[Candidate]) -> List[str]:
    from .plots import pareto_front

    return [points[i].key for i in pareto_front([(p.p50_ms, p.score) for p in points])]


def tune(source, data: Optional[Union[str, Path]], target: Target, *, runtime: str = "ort", batch: int = 1,
         methods: Optional[Sequence[str]] = None, budgets: Sequence[float] = DEFAULT_BUDGETS,
         flop_budgets: Sequence[float] = (), limit: Optional[int] = None, output: Optional[Union[str, Path]] = None,
         report_dir: Optional[Union[str, Path]] = None, cache_dir: Optional[Union[str, Path]] = None,
         token_counts: Optional[Sequence[int]] = None, rounds: int = 5, iters: int = 5, warmup: int = 2,
         block_rounds: int = 5, threads: int = 0, eval_batch: int = 64, workers: int = 0,
         split: Optional[str] = None, labels: Optional[Path] = None, class_order: str = "sorted",
         class_map: str = "auto", normalize: bool = True, prop_attn: bool = True, options: Optional[Mapping[str, Mapping[str, Any]]] = None,
         progress: Union[bool, Any] = True, on_status: Optional[Callable[[str], None]] = None) -> TuneResult:
    """Measure, choose, export, report (see the module docstring). ``source``: a
    :class:`~vitmerge.models.build.ModelSource`; ``data``: the labelled images (default: the folder its
    model.json names: a classification folder, or a COCO folder for a detector, opened as ``vitmerge eval`` opens
    it, with the same ``split`` / ``labels`` / ``class_order`` / ``class_map`` / ``normalize``); ``output``: where
    the chosen model is written (ONNX, verified); ``report_dir``:
    report.json, report.md, pareto.png and the latency table. Raises :class:`TargetNotMet` (after writing the
    report) when no candidate meets ``target``."""
    import copy

    from .._io import check_output_path
    from ..models.family import family
    from ..models.flops import count_flops
    from .compare import open_eval_data, score
    from .report import prepare_dir

    status = on_status or (lambda s: log.info("%s", s))
    if not isinstance(target, Target):
        raise UsageError(f"target must be a Target, got {target!r}")
    check_runtime(runtime)
    check_settings(batch, rounds, iters, block_rounds, limit, budgets, flop_budgets)
    out = check_output_path(output) if output is not None else None
    if report_dir is not None:
        prepare_dir(report_dir)
    data = data or source.data_dir
    if data is None:
        raise DataError("vitmerge tune needs labelled images to measure accuracy on: give --data DIR (a class-folder "
                        "tree, ImageNet val, CIFAR-100, ...; a detector: a COCO folder; see docs/data.md)")
    if not Path(data).expanduser().exists():
        raise DataError(f"--data {str(data)!r} does not exist")

    model = source.build().eval()
    ds, spec = open_eval_data(model, data, limit=limit, split=split, labels=labels, class_order=class_order,
                              class_map=class_map, normalize=normalize, what=f"{source.ref.label} ({source.weights})")
    metric = "top-1" if spec is None else "mAP"
    target = Target(target.kind, target.value, metric)
    status(f"data: {ds.describe()}")
    methods = list(methods) if methods else default_methods(model)
    if not methods:
        raise UsageError(f"no merge method applies to this model ({family(model).name})")
    from ..merging import method_spec

    for m in methods:
        method_spec(m)  # unknown -> ScheduleError listing the methods
    settings = {"rounds": rounds, "iters": iters, "warmup": warmup, "block_rounds": block_rounds,
                "token_counts": list(token_counts) if token_counts else None, "threads": threads,
                "prop_attn": prop_attn, "split": split, "labels": str(labels) if labels else None,
                "class_order": class_order, "class_map": class_map, "normalize": normalize}
    # the data's identity: its folder, and what was read from it (a folder that changed is another key)
    key = run_key(source, Path(data), runtime, batch, limit, dict(settings, images=len(ds), dataset=ds.describe()))
    cache = Cache((Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / key)
    work = {"block_latency": 0, "exports": 0, "accuracy": 0, "latency": 0}
    prog, own = _progress(progress)
    import torch

    old_threads = torch.get_num_threads()
    if runtime == "torch" and threads:
        torch.set_num_threads(threads)  # the candidates run in PyTorch with them too (restored at the end)
    task = prog.add_task("tune", total=None) if prog is not None else None

    def show(text: str) -> None:
        status(text)
        if prog is not None:
            prog.update(task, description=text)

    try:
        # 1. the block latency table
        table_path = cache.path(TABLE_NAME)
        raw = cache.read("block_latency.measured.json")
        if raw is None or not table_path.is_file():
            show(f"block latency on {runtime}, batch {batch}")
            table_raw = measure_block_latency(model, runtime, batch, token_counts, rounds=block_rounds, iters=iters,
                                              warmup=warmup, threads=threads)
            write_latency_table(table_raw, table_path)
            cache.write("block_latency.measured.json", {str(k): v for k, v in table_raw.items()})
            work["block_latency"] += 1
        else:
            table_raw = {int(k): float(v) for k, v in raw.items()}
        table = {int(k): float(v) for k, v in json.loads(table_path.read_text()).items()}

        # 2. candidates
        cands, skipped = plan_candidates(model, methods, budgets, flop_budgets, table_path, prop_attn, options)
        if not cands:
            raise UsageError("no merged candidate to measure: " + "; ".join(f"{a}: {r}" for a, r in skipped)
                             + " (try other --budgets, --flop-budgets or --methods)")
        if prog is not None:
            prog.update(task, total=len(cands) + 1, completed=0)

        # 3. the baseline: its file (ort), its logits on the held-out images
        base_runner = None

        def runner_for(m, name: str, info: Optional[Candidate] = None):
            if runtime == "torch":
                from ..backends import TorchRunner

                return TorchRunner(m, label=name, device="cpu")
            from ..backends import OrtRunner

            return OrtRunner(cached_export(m, name, info), runtime, threads, label=name)

        def cached_export(m, name: str, info: Optional[Candidate] = None) -> Path:
            from ..exporter import export

            path = cache.path(f"{name}.onnx")
            done = cache.read(f"{name}.export.json")
            if done is None or not path.is_file():
                show(f"{name}: exporting to ONNX (verified against PyTorch)")
                v = export(m, path).verification
                also = "".join(f", max |{n} diff| {d:.2e}" for n, d in v.output_diffs.items())
                if spec is None:
                    also += f", top-1 agreement {v.top1_agreement:.2%}"
                done = {"verification": f"verified: {v.how}, max |diff| {v.max_abs_diff:.2e}{also}"}
                cache.write(f"{name}.export.json", done)
                work["exports"] += 1
            if info is not None:
                info.onnx, info.verification = str(path), done.get("verification")
            return path

        got = cache.read("baseline.json")
        base = Candidate.from_dict(got) if got else None
        outputs_path = cache.path("baseline_outputs.npz")
        if base is None or not outputs_path.is_file():
            base = Candidate(key="unmerged", label="unmerged", method=None, budgets=[], r=[0] * len(
                family(model).blocks(model)), flops_fraction=1.0, speedup=1.0)
            # the unmerged model is only read (the runners and the exporter leave it as it is): no copy; merge()
            # patches a copy of it
            base_runner = runner_for(model, "unmerged", base)
            show("unmerged: scoring the held-out images")
            rec = _Recorder(base_runner)
            res = score({"unmerged": rec}, ds, spec, batch_size=eval_batch, progress=False, workers=workers)
            base.score, base.fidelity, base.images = res.models["unmerged"].score, 1.0, res.images
            base.flops = float(count_flops(model))
            rec.save(outputs_path)
            cache.write("baseline.json", base.to_dict())
            work["accuracy"] += 1
        import numpy as np

        with np.load(outputs_path) as z:  # the unmerged model's outputs, replayed beside every candidate
            base_outputs = {k: z[k] for k in z.files}
        if prog is not None:
            prog.advance(task)

        # 4. every candidate: build, export, score, time (each step cached)
        measured: List[Candidate] = []
        for c in cands:
            got = cache.read(f"{c.key}.json")
            if got is not None:
                old = Candidate.from_dict(got)
                old.budgets, old.label, old.request = c.budgets, c.label, c.request
                measured.append(old)
                if prog is not None:
                    prog.advance(task)
                continue
            from ..models.build import merge

            show(f"{c.label}: merging (r per block {c.r})")
            merged = merge(copy.deepcopy(model), request_of(c))
            c.tokens_out = list(merged.vitmerge.tokens_out)
            c.flops = float(count_flops(merged))
            c.flops_fraction = c.flops / base.flops
            runner = runner_for(merged, c.key, c)
            show(f"{c.label}: scoring the held-out images")
            res = score({"unmerged": _Replay(base_outputs), c.key: runner}, ds, spec, batch_size=eval_batch,
                        progress=False, workers=workers)
            c.score, c.fidelity, c.images = res.models[c.key].score, res.models[c.key].fidelity, res.images
            work["accuracy"] += 1
            show(f"{c.label}: latency on {runtime}, batch {batch}, interleaved with the unmerged model")
            if base_runner is None:
                base_runner = runner_for(model, "unmerged")
            base_runner.label, runner.label = "unmerged", c.key
            prof = profile_pair(base_runner, runner, batch, rounds, iters, warmup)
            c.baseline_p50_ms, c.p50_ms, c.p90_ms, c.speedup = prof
            work["latency"] += 1
            cache.write(f"{c.key}.json", c.to_dict())
            measured.append(c)
            if prog is not None:
                prog.advance(task)
        if not measured and base_runner is None:
            base_runner = runner_for(model, "unmerged")
        if measured:
            base.p50_ms = statistics.median(c.baseline_p50_ms for c in measured)
        else:
            from .profile import profile_targets

            row = profile_targets([base_runner], [batch], rounds=rounds, iters=iters, warmup=warmup).rows[0]
            base.p50_ms, base.p90_ms = row.stats.p50, row.stats.p90
        base.baseline_p50_ms = base.p50_ms

        # 5. the front, the choice (the unmerged model too: a merged model that is slower is no answer); the
        # chosen model's file (torch runtime: exported now, once)
        front = _front([base] + measured)
        chosen = target.choose([base] + measured, base)
        if chosen is not None and out is not None and not (chosen.onnx and Path(chosen.onnx).is_file()):
            from ..models.build import merge

            if chosen is base:
                cached_export(model, "unmerged", base)
                cache.write("baseline.json", base.to_dict())
            else:
                cached_export(merge(copy.deepcopy(model), request_of(chosen)), chosen.key, chosen)
                cache.write(f"{chosen.key}.json", chosen.to_dict())
    finally:
        torch.set_num_threads(old_threads)
        if own is not None:
            own.stop()
    best = target.best_found([base] + measured, base) if chosen is None else None
    settings = dict(settings, model=source.ref.spec, weights=source.weights, data=str(data), metric=metric,
                    dataset=ds.describe(), runtime=runtime, batch=batch, limit=limit, methods=methods,
                    budgets=list(budgets), flop_budgets=list(flop_budgets))
    result = TuneResult(settings=settings, target=target, table=table, table_raw=table_raw, table_path=table_path,
                        baseline=base, candidates=measured, skipped=skipped, front=front, chosen=chosen, best=best,
                        cache_dir=cache.dir, work=work)
    if chosen is not None and out is not None:
        show(f"writing {out}")
        result.output = write_chosen(chosen, out)
    if report_dir is not None:
        result.report = write_tune_report(result, report_dir)
    if chosen is None:
        raise TargetNotMet(not_met_message(result), result)
    return result


def profile_pair(base_runner, runner, batch: int, rounds: int, iters: int, warmup: int
                 ) -> Tuple[float, float, float, float]:
    """(unmerged p50, candidate p50, candidate p90, speed-up) in ms, the two interleaved round by round."""
    from .profile import profile_targets

    rows = profile_targets([base_runner, runner], [batch], rounds=rounds, iters=iters, warmup=warmup).rows
    return rows[0].stats.p50, rows[1].stats.p50, rows[1].stats.p90, rows[1].speedup


def not_met_message(result: TuneResult) -> str:
    t, b, base = result.target, result.best, result.baseline
    if b is None:
        why = "; ".join(f"{a}: {r}" for a, r in result.skipped[:3])
        return f"no candidate to choose from ({why or 'no budgets'}): try other --budgets or --methods"
    return (f"no candidate meets {t.describe()} (of {len(result.candidates)} merged candidates and the unmerged "
            f"model measured): the best found is "
            f"{b.label} with {t.metric} {b.score:.2%} ({b.gain(base):+.2f} points vs unmerged), p50 {b.p50_ms:.3f} ms, "
            f"speed-up {b.speedup:.2f}x; loosen the target or try other --budgets / --methods")


def write_chosen(chosen: Candidate, out: Path) -> Path:
    """The chosen model's verified ONNX file (from the cache, with its external data if any) copied to ``out``
    through one staged write."""
    import shutil

    from .._io import staged
    from ..exporter.onnx_export import output_files

    src = Path(chosen.onnx)
    side, _ = output_files(src)
    with staged(*output_files(out)) as stage:
        if side.is_file():  # external data is named inside the file: write it again under the new name
            import onnx

            onnx.save_model(onnx.load(str(src)), str(stage / out.name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=out.name + ".data")
        else:
            shutil.copyfile(src, stage / out.name)
    return out


# ------------------------------------------------------------------------------------------- report


def _progress(progress):
    """(Progress or None, the one this function started or None)."""
    if progress is True:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        own = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=Console(stderr=True), transient=True)
        own.start()
        return own, own
    return (progress or None), None


def plot_tune(result: TuneResult, path: Union[str, Path]) -> Path:
    """Top-1 vs p50 latency: each method's candidates, the Pareto front, the unmerged baseline (star), the
    chosen point (ringed) and the target (a dashed line where it is a line)."""
    from collections import defaultdict

    from .plots import _figure, save_png

    fig = _figure()
    ax = fig.add_subplot()
    groups: Dict[str, List[Candidate]] = defaultdict(list)
    for c in result.candidates:
        groups[c.method or "?"].append(c)
    for method, cs in groups.items():
        ax.scatter([c.p50_ms for c in cs], [c.score * 100 for c in cs], label=method, s=28, zorder=3)
    pts = {p.key: p for p in result.points}
    front = [pts[k] for k in result.front]
    ax.step([p.p50_ms for p in front], [p.score * 100 for p in front], where="post", color="black", lw=1.2,
            alpha=0.7, label="Pareto front", zorder=2)
    b = result.baseline
    ax.scatter([b.p50_ms], [b.score * 100], marker="*", s=180, color="tab:red", label="unmerged", zorder=4)
    if result.chosen is not None:
        c = result.chosen
        ax.scatter([c.p50_ms], [c.score * 100], s=260, facecolors="none", edgecolors="black", linewidths=2,
                   label=f"chosen: {c.label}", zorder=5)
    t = result.target
    if t.kind == "max_drop":
        ax.axhline(b.score * 100 - t.value, ls="--", color="grey", lw=1, label=t.describe())
    elif t.kind == "target_ms":
        ax.axvline(t.value, ls="--", color="grey", lw=1, label=t.describe())
    elif b.p50_ms == b.p50_ms:
        ax.axvline(b.p50_ms / t.value, ls="--", color="grey", lw=1, label=t.describe())
    s = result.settings
    ax.set_xlabel(f"p50 latency [ms] ({s['runtime']}, batch {s['batch']})")
    ax.set_ylabel(f"{t.metric} [%] ({b.images} held-out images)")
    ax.set_title("vitmerge tune: accuracy vs measured latency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return save_png(fig, path)


def tune_sections(result: TuneResult) -> List[Tuple[str, str]]:
    from .report import md_table

    s, b = result.settings, result.baseline
    chosen = result.chosen
    setup = "\n".join([
        f"- model: `{s['model']}` ({s['weights']})",
        f"- data: {s['dataset']}; {b.images} images scored (the same for every model)",
        f"- runtime: {s['runtime']}, batch {s['batch']}; latency: {s['rounds']} interleaved rounds x {s['iters']} "
        "calls of each candidate against the unmerged model (speed-up from the same rounds)",
        f"- methods: {', '.join(s['methods'])}; latency budgets {s['budgets']}; FLOP budgets {s['flop_budgets']}",
        f"- metric: {result.metric} as `vitmerge eval` scores it"
        + (" (mAP@[.5:.95]; the unmerged model's detections are the reference of mAP@0.5 fidelity)"
           if result.metric == "mAP" else " (agreement: same top-1 class as the unmerged model)"),
        f"- target: {result.target.describe()}",
        f"- cache: `{result.cache_dir}`",
    ])
    if chosen is b:
        choice = (f"**the unmerged model**: no merged candidate that meets the target ({result.target.describe()}) "
                  f"is faster than it on {s['runtime']} at batch {s['batch']} (p50 {b.p50_ms:.3f} ms)"
                  + (f"; written to `{result.output}`" if result.output else ""))
    elif chosen is not None:
        choice = (f"**{chosen.label}**: {result.metric} {chosen.score:.2%} ({chosen.gain(b):+.2f} points), p50 "
                  f"{chosen.p50_ms:.3f} ms vs {chosen.baseline_p50_ms:.3f} ms unmerged ({chosen.speedup:.2f}x), "
                  f"r per block {chosen.r}" + (f"; written to `{result.output}`" if result.output else ""))
    else:
        choice = not_met_message(result)
    rows = []
    for c in [b] + sorted(result.candidates, key=lambda c: c.p50_ms):
        rows.append([c.label + (" (chosen)" if chosen is not None and c.key == chosen.key else ""),
                     ", ".join(c.budgets) or "—", ",".join(map(str, c.r)), c.score * 100, c.gain(b),
                     c.fidelity * 100, c.p50_ms, c.speedup, c.flops_fraction,
                     "yes" if c.key in result.front else "", "yes" if result.target.meets(c, b) else "no"])
    table = md_table(["candidate", "budgets", "r per block", f"{result.metric} %", "vs unmerged (points)",
                      f"{result.fidelity_name} %",
                      "p50 ms", "speed-up", "FLOPs", "Pareto", "meets target"], rows,
                     formats=[None, None, None, ".2f", "+.2f", ".1f", ".3f", ".2f", ".3f", None, None])
    lat = md_table(["tokens", "measured ms", "table ms (monotone)"],
                   [[n, result.table_raw.get(n), result.table[n]] for n in sorted(result.table)],
                   formats=[None, ".4f", ".4f"])
    sections = [("Setup", setup), ("Choice", choice), ("Candidates", table),
                ("Block latency", f"One unmerged block on [{s['batch']}, N, C] inputs, {s['runtime']}; written as "
                                  f"`{TABLE_NAME}` (give it to `--budget-latency`).\n\n" + lat)]
    if result.skipped:
        sections.append(("Budgets without a candidate", "\n".join(f"- {a}: {r}" for a, r in result.skipped)))
    return sections


def write_tune_report(result: TuneResult, report_dir: Union[str, Path]):
    """report.json, report.md, pareto.png and block_latency.json in ``report_dir``."""
    from .report import prepare_dir, write_report

    d = prepare_dir(report_dir)
    atomic_write(d / TABLE_NAME, result.table_path.read_bytes())
    plots = [plot_tune(result, d / "pareto.png")] if result.candidates else []
    return write_report(d, "vitmerge tune", result.to_dict(), tune_sections(result), plots=plots)


__all__ = ["tune", "TuneResult", "Target", "TargetNotMet", "Candidate", "measure_block_latency", "monotone",
           "write_latency_table", "default_token_counts", "default_methods", "plan_candidates", "request_of",
           "check_runtime", "check_settings", "run_key", "Cache", "plot_tune", "write_tune_report", "default_cache_dir",
           "TUNE_RUNTIMES", "DEFAULT_BUDGETS"]
