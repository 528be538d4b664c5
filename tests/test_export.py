"""Export round trips (ONNX Runtime vs PyTorch) and the `vitmerge export` command's error paths."""
import json
import os

import numpy as np
import onnx
import pytest
import timm
import torch
from typer.testing import CliRunner

import vitmerge
from vitmerge.cli import app
from vitmerge.errors import CheckpointError, OutputPathError, VerificationError
from vitmerge.backends.ort import session as ort_session
from vitmerge.models.build import build_model

runner = CliRunner()

# Reduced depth keeps each export to seconds; token counts are the real ones for each resolution.
ROUND_TRIPS = [
    ("vit_tiny_patch16_224", dict(depth=3), 16, 197),
    ("deit_tiny_distilled_patch16_224", dict(depth=3), 16, 198),
    ("vit_tiny_patch16_384", dict(depth=2), 40, 577),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,kw,r,n_tokens", ROUND_TRIPS, ids=[t[0] for t in ROUND_TRIPS])
def test_round_trip(tmp_path, name, kw, r, n_tokens):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kw).eval()
    vitmerge.apply(model, r=r)
    assert model.vitmerge.tokens_in[0] == n_tokens
    path = tmp_path / "m.onnx"
    res = vitmerge.export(model, path, batch_sizes=(1, 4))
    assert res.verification.ok and [c.batch for c in res.verification.checks] == [1, 4]
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # nothing else left behind

    # Independently: a batch size the exporter never saw, through the same file.
    sess = ort_session(path)
    h = model.patch_embed.img_size[0]
    x = torch.randn(3, 3, h, h, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(x).numpy()
    out = sess.run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4)
    assert (out.argmax(-1) == ref.argmax(-1)).all()

    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["vitmerge.tokens_out"]) == model.vitmerge.tokens_out
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # dynamic batch axis
    # every merge step is findable by its name scope (graph surgery relies on it)
    scopes = {p.value for n in proto.graph.node for p in n.metadata_props if p.key == "namespace"}
    for i in range(len(model.blocks)):
        assert any(f"blocks.{i}.token_merge" in s for s in scopes)


@pytest.mark.slow
def test_r0_export_is_the_plain_model(tmp_path):
    torch.manual_seed(0)
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=96).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref = plain(x).numpy()
    vitmerge.apply(plain, r=0)
    vitmerge.export(plain, tmp_path / "p.onnx")
    proto = onnx.load(str(tmp_path / "p.onnx"))
    assert not any(n.op_type in ("TopK", "ScatterND", "ScatterElements") for n in proto.graph.node)
    out = ort_session(tmp_path / "p.onnx").run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_failed_verification_leaves_no_file(tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=64).eval()
    vitmerge.apply(model, r=4)
    with pytest.raises(VerificationError, match="not written"):
        vitmerge.export(model, tmp_path / "bad.onnx", atol=-1.0, rtol=0.0)  # nothing can pass
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- checkpoints
def _tiny():
    torch.manual_seed(3)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, num_classes=7).eval()


@pytest.mark.parametrize("fmt", ["pth_state_dict", "pt_model_key", "safetensors", "module_prefix"])
def test_checkpoint_formats_load_exactly(tmp_path, fmt):
    src = _tiny()
    sd = src.state_dict()
    if fmt == "pth_state_dict":
        path = tmp_path / "w.pth"
        torch.save(sd, path)
    elif fmt == "pt_model_key":
        path = tmp_path / "w.pt"
        torch.save({"model": sd, "epoch": 3}, path)
    elif fmt == "module_prefix":
        path = tmp_path / "w.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = build_model("vit_tiny_patch16_224", path, img_size=32, depth=1)
    assert model.num_classes == 7  # head size follows the checkpoint
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        build_model("vit_tiny_patch16_224", tmp_path / "missing.pth")
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match="could not read"):
        build_model("vit_tiny_patch16_224", bad)
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), other)
    with pytest.raises(CheckpointError, match="does not match"):
        build_model("vit_tiny_patch16_224", other, img_size=32, depth=1)


def test_output_path_errors(tmp_path):
    model = _tiny()
    (tmp_path / "f").write_text("a file")
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        vitmerge.export(model, tmp_path / "f" / "m.onnx")
    with pytest.raises(OutputPathError, match=r"\.onnx"):
        vitmerge.export(model, tmp_path / "m.txt")
    (tmp_path / "d.onnx").mkdir()
    with pytest.raises(OutputPathError, match="is a folder"):
        vitmerge.export(model, tmp_path / "d.onnx")
    assert sorted(os.listdir(tmp_path)) == ["d.onnx", "f"]
    # like --report-dir, a missing output folder is made (#21: -o refused it)
    res = vitmerge.export(model, tmp_path / "no" / "such" / "m.onnx", check=False)
    assert res.path.is_file() and res.path.parent == tmp_path / "no" / "such"


# ---------------------------------------------------------------- the CLI
TINY = ["--model-kwargs", '{"depth": 2}', "--img-size", "64"]


@pytest.mark.slow
def test_cli_export_success(tmp_path):
    out = tmp_path / "vit.onnx"
    res = runner.invoke(app, ["export", "vit_tiny_patch16_224", *TINY, "--r", "4", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert out.is_file()
    text = " ".join(res.output.split())
    assert "RANDOM weights" in text
    assert "tokens out" in text and "FLOPs/image" in text
    assert "batch 1:" in text and "batch 4:" in text and "top-1 agreement 100%" in text
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["vitmerge.tokens_out"]) == [13, 9]  # 17 -> 13 -> 9


def test_cli_rejects_unknown_choices_before_any_work(tmp_path):
    """--method / --merge-op are choices from the registry: a typo fails at parse time, listing them."""
    out = tmp_path / "m.onnx"
    for opt, bad, listed in (("--method", "nope", ["tome", "hash", "importance"]),
                             ("--merge-op", "fused", ["standard", "native", "plugin"])):
        res = runner.invoke(app, ["export", "vit_tiny_patch16_224", *TINY, opt, bad, "-o", str(out)])
        text = " ".join(res.output.replace("│", " ").split())  # typer's error box wraps long lines
        assert res.exit_code == 2 and f"'{bad}' is not one of" in text, res.output
        assert all(f"'{m}'" in text for m in listed)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args,message",
    [
        (["vit_smal_patch16_224"], "Did you mean: vit_small_patch16_224"),
        (["vit_tiny_patch16_224", *TINY, "--r", "9"], "too large"),
        (["vit_tiny_patch16_224", *TINY, "--r", "-3"], ">= 0"),
        (["vit_tiny_patch16_224", *TINY, "--r", "4,4,4"], "one r per block"),
        (["vit_tiny_patch16_224", *TINY, "--checkpoint", "MISSING.pth"], "does not exist"),
        (["vit_tiny_patch16_224", *TINY, "--model-kwargs", "{depth"], "JSON"),
    ],
)
def test_cli_bad_input(tmp_path, args, message):
    out = tmp_path / "m.onnx"
    res = runner.invoke(app, ["export", *args, "-o", str(out)])
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and message in " ".join(res.output.split())
    assert "Traceback" not in res.output
    assert os.listdir(tmp_path) == []


def test_cli_corrupt_checkpoint_and_missing_dir(tmp_path):
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    res = runner.invoke(app, ["export", "vit_tiny_patch16_224", *TINY, "-c", str(bad), "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 2 and "could not read checkpoint" in " ".join(res.output.split())
    # a missing output folder is made only when the file is written: a failed run leaves no empty folder
    res = runner.invoke(app, ["export", "vit_tiny_patch16_224", *TINY, "-c", str(bad), "-o",
                              str(tmp_path / "nodir" / "sub" / "m.onnx")])
    assert res.exit_code == 2 and "could not read checkpoint" in " ".join(res.output.split())
    assert sorted(os.listdir(tmp_path)) == ["corrupt.safetensors"]


@pytest.mark.slow
def test_cli_demo_small(tmp_path):
    res = runner.invoke(app, ["demo", "--latency-only", "--out-dir", str(tmp_path), "--model", "vit_tiny_patch16_224",
                              "--model-kwargs", '{"depth": 2, "img_size": 64}', "--r", "4",
                              "--batch", "1,2", "--rounds", "2", "--iters", "1"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "demo.json").read_text())
    assert [row["batch"] for row in report["latency"]] == [1, 2]
    assert report["flop_ratio"] > 1.0 and all(row["merged_p50_ms"] > 0 for row in report["latency"])
    assert "random" in report["weights"]
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == [
        "vit_tiny_patch16_224_tome_r4.onnx", "vit_tiny_patch16_224_unmerged.onnx"]


@pytest.mark.slow
def test_cli_export_budget_schedule(tmp_path):
    out = tmp_path / "b.onnx"
    res = runner.invoke(app, ["export", "vit_tiny_patch16_224", "--model-kwargs", '{"depth": 3}', "--img-size", "96",
                              "--budget", "0.6", "--no-verify", "-o", str(out)])
    assert res.exit_code == 0, res.output
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    rs = json.loads(meta["vitmerge.r"])
    assert len(rs) == 3 and sum(rs) > 0
    # the solved schedule really meets the budget when counted op by op
    from vitmerge.models.flops import flop_ratio

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3, img_size=96)
    vitmerge.apply(m, r=rs)
    base, merged, _ = flop_ratio(m)
    assert merged <= 0.6 * base * 1.01
    res = runner.invoke(app, ["export", "vit_tiny_patch16_224", "--budget", "0.0001", "-o", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and "budget" in res.output


def test_cli_option_parsing():
    from vitmerge.errors import ScheduleError
    from vitmerge.request import parse_options

    assert parse_options(["bits=8", "vocab=v.pt", "mode=inter", "tradeoff=0.5"]) == {
        "bits": 8, "vocab": "v.pt", "mode": "inter", "tradeoff": 0.5}
    with pytest.raises(ScheduleError, match="KEY=VALUE"):
        parse_options(["bits"])


@pytest.mark.slow
def test_cli_export_method_options_and_img_size_in_kwargs(tmp_path):
    out = tmp_path / "h.onnx"
    res = runner.invoke(app, ["export", "vit_tiny_patch16_224", "--model-kwargs", '{"depth": 2, "img_size": 64}',
                              "--method", "hash", "-O", "bits=8", "--r", "6", "-o", str(out)])
    assert res.exit_code == 0, res.output
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["vitmerge.method"] == "hash" and json.loads(meta["vitmerge.options"]) == {"bits": 8}
    assert json.loads(meta["vitmerge.tokens_out"]) == [11, 5]
    res = runner.invoke(app, ["export", "vit_tiny_patch16_224", *TINY, "--method", "hash", "-O", "bits=0", "--r", "4",
                              "-o", str(tmp_path / "bad.onnx")])
    assert res.exit_code == 2 and "bits" in res.output and not (tmp_path / "bad.onnx").exists()


def test_budget_latency_schedule(tmp_path):
    from vitmerge.models.budget import resolve_schedule
    from vitmerge.errors import ScheduleError

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=4, img_size=64)  # 17 tokens
    table = tmp_path / "lat.json"
    table.write_text(json.dumps({str(n): float(n) for n in (1, 17)}))  # block latency linear in tokens
    rs = resolve_schedule(model, "tome", 0, budget=0.6, budget_latency=table)
    vitmerge.apply(model, r=rs)
    # the same cost model, computed here by hand: mean of the latency at tokens in and out
    cost = sum(n_in if e == 0 else 0.5 * (n_in + n_out) for n_in, e, n_out in model.vitmerge.tokens)
    assert cost <= 0.6 * 4 * 17 and sum(rs) > 0
    with pytest.raises(ScheduleError, match="needs --budget"):
        resolve_schedule(model, "tome", 0, budget_latency=table)
    table.write_text("[1, 2]")
    with pytest.raises(ScheduleError, match="JSON object"):
        resolve_schedule(model, "tome", 0, budget=0.5, budget_latency=table)
    res = runner.invoke(app, ["export", "vit_tiny_patch16_224", *TINY, "--budget", "0.5", "--budget-latency",
                              str(tmp_path / "none.json"), "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 2 and "does not exist" in res.output
