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
    (["--output", "{tmp}/no/such/dir/x.png"], "does not exist"),
])
def test_cli_bad_input(tmp_path, args, needle):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = runner.invoke(app, ["visualize", "vit_tiny_patch16_224", "--img-size", "32", *args])
    assert res.exit_code == 2
    assert needle in " ".join(res.output.split())
    assert list(tmp_path.iterdir()) == []  # nothing written
