"""ImageNet val with the ILSVRC2012 devkit, and the class-index order, on tiny generated devkits.

The devkit is written the way the real one is laid out (``meta.mat`` with the ``synsets`` struct
fields, written with scipy; the ground-truth file; the ``ILSVRC2012_devkit_t12/`` archive). Expected
labels come from the generated tables, and from torchvision's own ``ImageNet`` reader run on a copy
(with its md5 table pointed at None, since the archives are not the official ones).
"""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from typer.testing import CliRunner

from vitmerge.data import open_dataset
from vitmerge.data.imagenet import DEVKIT_ARCHIVE, order_mismatch_hint, read_devkit
from vitmerge.errors import DataError, UsageError

FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
          "num_train_images")


def write_meta_mat(path: Path, wnids_in_id_order, parents: int = 2):
    """The devkit's meta.mat: leaves (num_children 0) carry ILSVRC2012_ID 1..K, then inner synsets."""
    rows = [(i + 1, w, f"thing {i}, alias", f"gloss {i}", 0, np.zeros((0,), np.uint8), 0, 1300)
            for i, w in enumerate(wnids_in_id_order)]
    k = len(rows)
    rows += [(k + 1 + j, f"n0{j:07d}", "group", "an inner synset", 2, np.array([1, 2], np.uint8), 1, 0)
             for j in range(parents)]
    arr = np.array(rows, dtype=[(f, "O") for f in FIELDS]).reshape(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"synsets": arr})


class Kit:
    """A generated devkit: ``wnids[id - 1]`` is the class of ILSVRC2012_ID ``id``; ``gt[k - 1]`` the id of
    val image k."""

    def __init__(self, root: Path, wnids, gt):
        self.wnids, self.gt = list(wnids), list(gt)
        self.folder = root / "ILSVRC2012_devkit_t12"
        write_meta_mat(self.folder / "data" / "meta.mat", self.wnids)
        (self.folder / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in gt))
        self.archive = root / DEVKIT_ARCHIVE
        with tarfile.open(self.archive, "w:gz") as tar:
            tar.add(self.folder, arcname="ILSVRC2012_devkit_t12")

    def sorted_label(self, k: int) -> int:  # what timm / torchvision checkpoints predict for val image k
        return sorted(self.wnids).index(self.wnids[self.gt[k - 1] - 1])

    def devkit_label(self, k: int) -> int:
        return self.gt[k - 1] - 1


def make_kit(tmp_path: Path, n_classes: int = 6, per_class: int = 2, seed: int = 0) -> Kit:
    rng = np.random.default_rng(seed)
    wnids = [f"n{v:08d}" for v in rng.choice(10**7, n_classes, replace=False) + 10**7]  # random: id order != sorted
    gt = rng.permutation(np.repeat(np.arange(1, n_classes + 1), per_class)).tolist()  # every class in val
    kit = Kit(tmp_path / "devkit_src", wnids, gt)
    assert sorted(wnids) != wnids  # the two orders differ, or the test could not tell them apart
    return kit


def val_images(folder: Path, n: int, size=(12, 10)) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(1, n + 1):
        f = folder / f"ILSVRC2012_val_{k:08d}.JPEG"
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (*size, 3), dtype=np.uint8)).save(f, "JPEG")
        out.append(f)
    return out


def by_name(ds):
    return {Path(ref).name: y for ref, y in ds.items}


def test_flat_val_with_devkit_archive_matches_torchvision_imagenet(tmp_path, monkeypatch):
    import torchvision.datasets.imagenet as tvi
    from torchvision.datasets import ImageNet

    kit = make_kit(tmp_path)
    val = tmp_path / "val"
    files = val_images(val, len(kit.gt))
    shutil.copy(kit.archive, val / DEVKIT_ARCHIVE)
    before = sorted(p.relative_to(val) for p in val.rglob("*"))

    ds = open_dataset(val)
    assert ds.layout == "imagenet-val (flat + devkit)" and len(ds) == len(files)
    assert ds.classes == sorted(kit.wnids) and "sorted WordNet ids" in ds.describe()
    assert by_name(ds) == {f.name: kit.sorted_label(k) for k, f in enumerate(files, 1)}
    assert sorted(p.relative_to(val) for p in val.rglob("*")) == before  # nothing moved or written

    # torchvision's reader on a copy: it parses the devkit itself and moves the images into class folders
    root = tmp_path / "tv"
    root.mkdir()
    shutil.copy(kit.archive, root / DEVKIT_ARCHIVE)
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as tar:
        for f in files:
            tar.add(f, arcname=f.name)
    monkeypatch.setitem(tvi.ARCHIVE_META, "devkit", (DEVKIT_ARCHIVE, None))
    monkeypatch.setitem(tvi.ARCHIVE_META, "val", ("ILSVRC2012_img_val.tar", None))
    tv = ImageNet(str(root), split="val")
    assert tv.wnids == ds.classes
    assert by_name(ds) == {Path(p).name: y for p, y in tv.samples}


def test_devkit_folder_archive_and_labels_option_agree(tmp_path):
    kit = make_kit(tmp_path, seed=1)
    expect = {f"ILSVRC2012_val_{k:08d}.JPEG": kit.sorted_label(k) for k in range(1, len(kit.gt) + 1)}
    a = tmp_path / "a"
    val_images(a, len(kit.gt))
    shutil.copytree(kit.folder, a / "ILSVRC2012_devkit_t12")  # extracted devkit next to the images
    assert by_name(open_dataset(a)) == expect
    b = tmp_path / "b"
    val_images(b, len(kit.gt))
    for given in (kit.archive, kit.folder, kit.folder.parent):  # --labels: archive, extracted folder, its parent
        assert by_name(open_dataset(b, labels=given)) == expect
    # torchvision's ImageNet root: devkit archive + val/ (+ train/); eval takes val
    root = tmp_path / "imagenet"
    val_images(root / "val", len(kit.gt))
    (root / "train" / kit.wnids[0]).mkdir(parents=True)
    shutil.copy(kit.archive, root / DEVKIT_ARCHIVE)
    ds = open_dataset(root)
    assert ds.root == root / "val" and by_name(ds) == expect


def test_a_subset_of_val_and_other_files(tmp_path):
    kit = make_kit(tmp_path, seed=2)
    val = tmp_path / "val"
    files = val_images(val, len(kit.gt))
    for f in files[::2]:
        f.unlink()  # a subset of the val images: labels still by each file's number
    Image.new("RGB", (8, 8)).save(val / "holiday.jpg")
    shutil.copy(kit.archive, val / DEVKIT_ARCHIVE)
    ds = open_dataset(val)
    assert by_name(ds) == {f.name: kit.sorted_label(k) for k, f in enumerate(files, 1) if f.exists()}
    assert any("1 images are not named ILSVRC2012_val" in n for n in ds.notes)


def test_devkit_class_order_is_explicit_and_loud(tmp_path):
    kit = make_kit(tmp_path, seed=3)
    val = tmp_path / "val"
    files = val_images(val, len(kit.gt))
    with pytest.warns(UserWarning, match="devkit's ILSVRC2012_ID class order"):
        ds = open_dataset(val, labels=kit.archive, class_order="devkit")
    assert ds.classes == kit.wnids
    assert by_name(ds) == {f.name: kit.devkit_label(k) for k, f in enumerate(files, 1)}
    assert "NOT the order of timm / torchvision" in ds.describe() and "ILSVRC2012_ID" in ds.notes[0]
    assert ds.subset(3).describe().endswith(f"({val})") and "NOT the order" in ds.subset(3).describe()
    with pytest.raises(UsageError, match="unknown class order"):
        open_dataset(val, labels=kit.archive, class_order="wnid")


def test_class_folders_renumbered_to_devkit_order_only_with_a_devkit(tmp_path, monkeypatch):
    kit = make_kit(tmp_path, seed=4)
    folders = tmp_path / "val"
    for i, w in enumerate(kit.wnids):
        (folders / w).mkdir(parents=True)
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folders / w / f"{i}.png")
    ds = open_dataset(folders)  # torchvision's ImageFolder: sorted wnids
    assert ds.classes == sorted(kit.wnids) and "sorted WordNet ids" in ds.describe()
    with pytest.raises(DataError, match="needs the ImageNet devkit"):
        open_dataset(folders, class_order="devkit")
    with pytest.warns(UserWarning):
        ds = open_dataset(folders, labels=kit.archive, class_order="devkit")
    assert ds.classes == kit.wnids
    assert {Path(r).parent.name: y for r, y in ds.items} == {w: i for i, w in enumerate(kit.wnids)}
    shutil.copytree(kit.folder, folders / "ILSVRC2012_devkit_t12")  # the extracted devkit among the classes
    assert open_dataset(folders).classes == sorted(kit.wnids)  # is not a class
    monkeypatch.chdir(folders)
    with pytest.warns(UserWarning):  # given relative to the working folder: still recognised as the devkit
        assert open_dataset(folders, labels="ILSVRC2012_devkit_t12", class_order="devkit").classes == kit.wnids
    plain = tmp_path / "plain"
    (plain / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(plain / "cat" / "0.png")
    with pytest.raises(DataError, match="applies to ImageNet labels"):
        open_dataset(plain, labels=kit.archive, class_order="devkit")


def test_imagenet_1k_devkit_gives_timms_label_order(tmp_path):
    """With the 1000 ImageNet-1k synsets in a shuffled devkit order, the classes are exactly timm's
    ImageNetInfo label names, the order its pretrained classifiers use."""
    from timm.data import ImageNetInfo

    timm_order = ImageNetInfo().label_names()
    rng = np.random.default_rng(5)
    wnids = [timm_order[i] for i in rng.permutation(1000)]
    gt = rng.integers(1, 1001, 20).tolist()
    kit = Kit(tmp_path / "kit", wnids, gt)
    val = tmp_path / "val"
    val_images(val, 20, size=(4, 4))
    ds = open_dataset(val, labels=kit.archive)
    assert ds.classes == timm_order
    assert ds.labels == [timm_order.index(wnids[i - 1]) for i in gt]


@pytest.mark.parametrize("case", ["no_meta", "not_a_tar", "bad_mat", "no_gt", "unnamed_images", "bad_gt"])
def test_bad_devkits_say_what_is_wrong(tmp_path, case):
    kit = make_kit(tmp_path, seed=6)
    val = tmp_path / "val"
    val_images(val, len(kit.gt))
    given = kit.archive
    expect = {"no_meta": "is not an ILSVRC2012 devkit", "not_a_tar": "cannot read the ImageNet devkit archive",
              "bad_mat": "cannot read data/meta.mat", "no_gt": "has no data/ILSVRC2012_validation_ground_truth",
              "unnamed_images": "is named ILSVRC2012_val_NNNNNNNN", "bad_gt": "one ILSVRC2012_ID"}[case]
    if case in ("no_meta", "bad_mat", "no_gt", "bad_gt"):
        given = tmp_path / "broken_devkit"
        shutil.copytree(kit.folder, given)
        data = given / "data"
        {"no_meta": lambda: (data / "meta.mat").unlink(),
         "bad_mat": lambda: scipy.io.savemat(str(data / "meta.mat"), {"other": np.zeros(3)}),
         "no_gt": lambda: (data / "ILSVRC2012_validation_ground_truth.txt").unlink(),
         "bad_gt": lambda: (data / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n0\n")}[case]()
    elif case == "not_a_tar":
        given = tmp_path / "fake_devkit.tar.gz"
        given.write_bytes(b"\x1f\x8b not gzip")
    else:
        for f in val.iterdir():
            f.rename(val / f"img_{f.name[-9:]}")
    with pytest.raises(DataError, match=expect):
        open_dataset(val, labels=given)


def test_devkit_parser_agrees_with_torchvisions_parse_devkit_archive(tmp_path, monkeypatch):
    import torchvision.datasets.imagenet as tvi

    kit = make_kit(tmp_path, n_classes=9, per_class=3, seed=7)
    monkeypatch.setitem(tvi.ARCHIVE_META, "devkit", (DEVKIT_ARCHIVE, None))
    tvi.parse_devkit_archive(str(kit.archive.parent))  # writes meta.bin next to the archive (a test copy)
    wnid_to_classes, val_wnids = tvi.load_meta_file(str(kit.archive.parent))
    ours = read_devkit(kit.archive)
    assert set(wnid_to_classes) == set(ours.wnids)
    assert [ours.wnids[i - 1] for i in ours.val_ids] == val_wnids
    assert {w: tuple(t.split(", ")) for w, t in ours.words.items()} == wnid_to_classes


def test_order_mismatch_hint_only_near_chance():
    order = "sorted WordNet ids (...)"
    assert "near chance" in order_mismatch_hint(order, 1000, 0.001, 5000)
    assert order_mismatch_hint(order, 1000, 0.6, 5000) is None  # a working model
    assert order_mismatch_hint(order, 1000, 0.001, 50) is None  # too few images to say
    assert order_mismatch_hint(None, 1000, 0.001, 5000) is None  # not ImageNet-style labels
    assert order_mismatch_hint(order, 10, 0.0, 5000) is None  # few classes: chance is not small


def test_eval_cli_prints_the_class_order_and_warns_near_chance(tmp_path):
    """A 100-class checkpoint with untrained weights scores near chance: eval names the order used
    and points at it; with --class-order devkit it warns before scoring."""
    import timm

    from vitmerge.cli import app

    kit = make_kit(tmp_path, n_classes=100, per_class=1, seed=8)
    val = tmp_path / "val"
    val_images(val, 100, size=(32, 32))
    shutil.copy(kit.archive, val / DEVKIT_ARCHIVE)
    kwargs = {"img_size": 32, "patch_size": 16, "depth": 1, "embed_dim": 48, "num_heads": 2}
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=100, **kwargs)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    args = ["eval", "vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "w.pth"), "--data", str(val),
            "--model-kwargs", json.dumps(kwargs), "--batch-size", "50", "--r", "0"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    out = " ".join(res.output.split())
    assert "class order: sorted WordNet ids" in out
    assert "near chance (1/100) on 100 images" in out
    res = CliRunner().invoke(app, args + ["--class-order", "devkit"])
    out = " ".join(res.output.split())
    assert res.exit_code == 0 and "warning: labels use the devkit's ILSVRC2012_ID class order" in out
