"""Token-merge visualisation: groups match the static schedule and the model's own size bookkeeping."""
import numpy as np
import pytest
import timm
import torch
from typer.testing import CliRunner

from vitmerge.cli import app
from vitmerge.errors import DataError
from vitmerge.profiling import visualize as vz

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny(img_size=96, depth=3):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=img_size, depth=depth, pretrained=False).eval()


@pytest.fixture(scope="module")
def chelsea():
    return vz.load_image("skimage:chelsea")


def test_groups_follow_the_schedule_and_token_sizes(chelsea):
    model = tiny()
    vis = vz.visualize_model(model, chelsea, method="tome", r=4)
    info = model.vitmerge
    assert info.tokens_out == [33, 29, 25]  # 36 patches + cls, minus 4 per block
    assert vis.groups.shape == (6, 6)
    assert vis.n_groups == info.tokens_out[-1] - info.protected == 24
    # Independent: the merge's own size bookkeeping counts original tokens per final token.
    counts = np.bincount(vis.groups.ravel(), minlength=vis.tokens_final)
    assert vis.sizes is not None
    np.testing.assert_array_equal(counts[info.protected:], vis.sizes[info.protected:].round().astype(int))
    assert counts[: info.protected].sum() == 0  # the cls token holds no patch
    assert vis.sizes[: info.protected].tolist() == [1.0]


def test_mean_colour_fill_against_a_loop(chelsea):
    model = tiny()
    vis = vz.visualize_model(model, chelsea, method="tome", r=6)
    ph, pw = vis.patch
    img = vis.image.astype(np.float64)
    for g in np.unique(vis.groups):
        cells = np.argwhere(vis.groups == g)
        pix = np.concatenate([img[i * ph:(i + 1) * ph, j * pw:(j + 1) * pw].reshape(-1, 3) for i, j in cells])
        mean = np.clip(np.rint(pix.mean(0)), 0, 255)
        for i, j in cells:
            block = vis.coloured[i * ph:(i + 1) * ph, j * pw:(j + 1) * pw]
            assert (block == mean).all()


def test_borders_against_a_loop():
    groups = np.array([[0, 0, 1], [2, 0, 1]])
    edge = vz.group_borders(groups, (2, 2))
    pix = np.repeat(np.repeat(groups, 2, 0), 2, 1)
    ref = np.zeros_like(edge)
    H, W = pix.shape
    for y in range(H):
        for x in range(W):
            for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < H and 0 <= xx < W and pix[yy, xx] != pix[y, x]:
                    ref[y, x] = True
    np.testing.assert_array_equal(edge, ref)


def test_r0_keeps_every_patch_alone(chelsea):
    vis = vz.visualize_model(tiny(img_size=64, depth=2), chelsea, r=0)
    assert vis.n_groups == 16 and sorted(vis.groups.ravel().tolist()) == list(range(1, 17))


def test_merge_groups_rejects_a_broken_source_map():
    src = np.zeros((3, 5))
    src[0, 0] = 1
    src[1, 1:3] = 1
    src[2, 2:5] = 1  # patch 2 (column 2) held twice
    with pytest.raises(ValueError, match="held by 2"):
        vz.merge_groups(src, protected=1, grid=(2, 2))


def test_load_image_errors(tmp_path):
    with pytest.raises(DataError, match="skimage:astronaut"):
        vz.load_image("skimage:nope")
    with pytest.raises(DataError, match="does not exist"):
        vz.load_image(tmp_path / "missing.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="could not read"):
        vz.load_image(bad)


def test_cli_writes_png_from_file_and_skimage(tmp_path):
    from PIL import Image

    photo = tmp_path / "coffee.jpg"
    Image.fromarray(vz.load_image("skimage:coffee")).save(photo)
    for image, out in ((str(photo), tmp_path / "a.png"), ("skimage:astronaut", tmp_path / "b.png")):
        res = runner.invoke(app, ["visualize", "vit_tiny_patch16_224", "--img-size", "64", "--r", "2",
                                  "--image", image, "--output", str(out)])
        assert res.exit_code == 0, res.output
        data = out.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
        assert "groups" in res.output


@pytest.mark.parametrize("args,needle", [
    (["--image", "skimage:nope", "--output", "{tmp}/x.png"], "unknown scikit-image photo"),
    (["--image", "{tmp}/missing.jpg", "--output", "{tmp}/x.png"], "does not exist"),
    (["--output", "{tmp}/x.jpg"], "must end in .png"),
])
def test_cli_bad_input(tmp_path, args, needle):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = runner.invoke(app, ["visualize", "vit_tiny_patch16_224", "--img-size", "32", "--r", "2", *args])
    assert res.exit_code == 2
    assert needle in " ".join(res.output.split())
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_output_folder_is_created_like_every_output_and_removed_when_nothing_is_written(tmp_path):
    """#21: -o refused a missing folder while --report-dir and --repo created one; now every output does, and a
    failed run leaves no empty folder behind."""
    out = tmp_path / "no" / "such" / "x.png"
    res = runner.invoke(app, ["visualize", "vit_tiny_patch16_224", "--img-size", "32", "--r", "99", "-o", str(out)])
    assert res.exit_code == 2 and "too large" in res.output
    assert list(tmp_path.iterdir()) == []
    res = runner.invoke(app, ["visualize", "vit_tiny_patch16_224", "--img-size", "32", "--r", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == PNG_MAGIC


# --------------------------------------------------------------------------------------------
# Detectors: boxes of the unmerged vs the merged model
# --------------------------------------------------------------------------------------------


def _dense(seed=3, classes=4):
    from vitmerge.models.dense import DenseDetector

    torch.manual_seed(seed)
    bb = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0, depth=3)
    return DenseDetector(bb, classes).eval()


def _expected_boxes(det, photo, min_score):
    """Independent of the visualiser: PIL bilinear resize of the whole photo, timm's mean/std, the detector's
    own forward, per-cell sigmoid scores with torchvision's class-wise NMS at 0.5, kept >= min_score."""
    from PIL import Image
    from timm.data import resolve_data_config
    from torchvision.ops import batched_nms, box_convert

    cfg = resolve_data_config({}, model=det.backbone)
    img = np.asarray(Image.fromarray(photo).resize((64, 64), Image.BILINEAR), dtype=np.float32) / 255
    x = (torch.from_numpy(img).permute(2, 0, 1)[None] - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / \
        torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = det(x)
    s = out.logits[0].sigmoid()  # [Q, C]
    q, c = (s > 0.05).nonzero(as_tuple=True)
    xyxy = box_convert(out.boxes[0][q], "cxcywh", "xyxy") * 64
    keep = batched_nms(xyxy, s[q, c], c, 0.5)[:20]
    keep = keep[s[q, c][keep] >= min_score]
    return {tuple(round(float(v), 3) for v in b) + (int(l),) for b, l in zip(xyxy[keep], c[keep])}


def test_detection_boxes_are_the_detectors_own(chelsea):
    """Unmerged boxes = the detector's own detections on the resized photo; merged = a copy merged with
    vitmerge.apply; r = 0 draws the unmerged boxes twice; the detector handed in stays unmerged."""
    import copy

    import vitmerge

    det = _dense()
    vis = vz.visualize_detections(det, chelsea, method="tome", r=[6, 4, 2], min_score=0.3)
    as_set = lambda d: {tuple(round(float(v), 3) for v in b) + (int(l),) for b, l in zip(d["boxes"], d["labels"])}  # noqa: E731
    assert len(vis.unmerged["boxes"]) >= 2
    assert as_set(vis.unmerged) == _expected_boxes(det, chelsea, 0.3)
    merged = copy.deepcopy(det)
    vitmerge.apply(merged, "tome", [6, 4, 2])
    assert as_set(vis.merged) == _expected_boxes(merged, chelsea, 0.3) != as_set(vis.unmerged)
    assert getattr(det, "vitmerge", None) is None  # the caller's model was not patched
    assert vis.tokens == (17, 5) and vis.image.shape == (64, 64, 3)
    same = vz.visualize_detections(det, chelsea, r=0, min_score=0.3)
    assert as_set(same.merged) == as_set(same.unmerged)


def test_draw_boxes_outlines_each_box_in_its_class_colour():
    img = np.full((40, 50, 3), 128, np.uint8)
    dets = {"boxes": np.array([[5.0, 8.0, 25.0, 30.0]]), "scores": np.array([0.9]), "labels": np.array([2])}
    out = vz.draw_boxes(img, dets, scale=2, width=1)
    colour = vz.BOX_COLOURS[2]
    assert out.shape == (80, 100, 3)
    # outline: x in [10, 49], y in [16, 59] at scale 2
    for y, x in ((40, 10), (40, 49), (59, 30)):
        assert tuple(out[y, x]) == colour, (y, x)
    assert tuple(out[40, 30]) == (128, 128, 128) and tuple(out[40, 9]) == (128, 128, 128)  # inside / outside
    assert (out[0:16, 10:40] != 128).any()  # the label above the box


def test_cli_draws_detector_boxes_on_a_photo(tmp_path):
    torch.save(_dense().state_dict(), tmp_path / "det.pth")
    base = ["visualize", "dense:vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "det.pth"), "--img-size", "64",
            "--model-kwargs", '{"depth": 3}', "--image", "skimage:astronaut"]
    res = runner.invoke(app, [*base, "--r", "6,4,2", "--score", "0.3", "--output", str(tmp_path / "det.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "det.png").read_bytes()[:8] == PNG_MAGIC
    assert "unmerged" in res.output and "17 -> 5" in res.output
    res = runner.invoke(app, [*base, "--score", "1.5", "--output", str(tmp_path / "bad.png")])
    assert res.exit_code == 2 and "--score" in res.output and not (tmp_path / "bad.png").exists()
