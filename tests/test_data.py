"""Dataset loaders on tiny layouts built here: ImageFolder, ImageNet flat + labels, CIFAR-100, Pets.

Expected labels are written down from how each layout is defined (class folders sorted by name,
'<class id 1..37>' minus one, the pickles' fine_labels), not read back through the readers. The
ImageNet devkit layout has its own file, test_data_imagenet.py.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitmerge.data import (LAYOUTS, BatchStats, CALIBRATION_SPLITS, EVAL_SPLITS, batches, data_config,
                           eval_transform, open_dataset)
from vitmerge.errors import DataError

CFG = {"input_size": [3, 8, 8], "interpolation": "bilinear", "mean": [0.5, 0.25, 0.75],
       "std": [0.5, 0.2, 0.25], "crop_pct": 1.0, "crop_mode": "center"}


def rgb(seed: int, size=(8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def reference_tensor(arr: np.ndarray) -> torch.Tensor:
    """What preprocessing must give for an image already at the input size: (x/255 - mean) / std, CHW."""
    x = arr.astype(np.float64) / 255.0
    x = (x - np.array(CFG["mean"])) / np.array(CFG["std"])
    return torch.from_numpy(x.transpose(2, 0, 1)).float()


def test_image_folder_classes_labels_pixels_and_unreadable(tmp_path):
    arrays = {}
    for c, cls in enumerate(["cat", "ant", "bee"]):  # sorted: ant=0, bee=1, cat=2
        for j in range(2):
            arrays[tmp_path / cls / f"{j}.png"] = rgb(10 * c + j)
            save(tmp_path / cls / f"{j}.png", arrays[tmp_path / cls / f"{j}.png"])
    (tmp_path / "bee" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (tmp_path / "bee" / "notes.txt").write_text("not an image")
    (tmp_path / "bee" / "anim.gif").write_bytes(b"GIF89a")  # not in torchvision's ImageFolder extensions
    save(tmp_path / "cat" / "._0.png", rgb(99))  # macOS metadata twin: hidden, not an image
    save(tmp_path / ".ipynb_checkpoints" / "x.png", rgb(98))  # hidden folder: not a class (it would sort first)
    save(tmp_path / "ant" / ".cache" / "y.png", rgb(97))  # hidden folder inside a class
    (tmp_path / "empty_dir").mkdir()

    ds = open_dataset(tmp_path, transform=eval_transform(CFG))
    assert ds.layout == "imagefolder" and ds.class_order is None
    assert ds.classes == ["ant", "bee", "cat", "empty_dir"]  # an empty folder stays a class (torchvision's rule)
    assert len(ds) == 7  # 6 images + the broken one; .txt, .gif and hidden entries are not images
    assert any("1 class folders hold no images" in n and "empty_dir" in n for n in ds.notes)

    stats = BatchStats()
    xs, ys = zip(*batches(ds, batch_size=3, stats=stats))
    x, y = torch.cat(xs), torch.cat(ys)
    assert len(stats.unreadable) == 1 and stats.unreadable[0].endswith("broken.jpg")
    assert stats.seen == 7 and len(x) == 6
    readable = [(ref, lab) for ref, lab in ds.items if not ref.endswith("broken.jpg")]
    for i, (ref, lab) in enumerate(readable):
        assert int(y[i]) == lab == ["ant", "bee", "cat"].index(ref.split("/")[-2])
        torch.testing.assert_close(x[i], reference_tensor(arrays[Path(ref)]), atol=1e-6, rtol=0)


def test_image_folder_empty_class_keeps_the_following_indices(tmp_path):
    save(tmp_path / "a" / "0.png", rgb(0))
    (tmp_path / "b").mkdir()  # empty
    save(tmp_path / "c" / "0.png", rgb(1))
    ds = open_dataset(tmp_path)
    assert ds.classes == ["a", "b", "c"] and ds.labels == [0, 2]  # c is still class 2


def test_image_folder_numbered_classes_follow_torchvision_and_say_so(tmp_path):
    for c in ("c2", "c10", "c1"):
        save(tmp_path / c / "0.png", rgb(len(c)))
    ds = open_dataset(tmp_path)
    assert ds.classes == ["c1", "c10", "c2"]  # plain name order, as torchvision's ImageFolder
    assert [Path(r).parent.name for r, y in ds.items if y == 1] == ["c10"]
    assert any("'2' before '10'" in n for n in ds.notes)
    save(tmp_path / "c3" / "0.png", rgb(5))
    (tmp_path / "c10" / "0.png").unlink()
    (tmp_path / "c10").rmdir()
    assert not any("'2' before '10'" in n for n in open_dataset(tmp_path).notes)  # no ambiguity: no note


def test_imagenet_flat_with_val_txt_and_loc_csv(tmp_path):
    names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 6)]
    for i, n in enumerate(names):
        save(tmp_path / n, rgb(i))
    # caffe-style: '<file> <index>'; the 5th image has no entry, one entry has no file
    (tmp_path / "val.txt").write_text("\n".join(f"{n} {lab}" for n, lab in zip(names[:4], [3, 0, 999, 3]))
                                      + "\nILSVRC2012_val_00000099.JPEG 7\n")
    ds = open_dataset(tmp_path)
    assert ds.layout.startswith("imagenet-val (flat")
    assert ds.labels == [3, 0, 999, 3] and ds.num_classes == 1000
    assert "indices written in val.txt" in ds.describe()
    assert any("no entry" in n for n in ds.notes) and any("no image file" in n for n in ds.notes)

    # Kaggle's LOC_val_solution.csv: synset ids; class index = position in sorted synsets
    (tmp_path / "val.txt").unlink()
    synsets = ["n00000002", "n00000001", "n00000003", "n00000001", "n00000002"]
    rows = ["ImageId,PredictionString"] + [f"{n[:-5]},{s} 1 2 3 4 {s} 5 6 7 8" for n, s in zip(names, synsets)]
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    ds = open_dataset(tmp_path)
    assert ds.classes == ["n00000001", "n00000002", "n00000003"]
    assert ds.labels == [1, 0, 2, 0, 1]
    assert "class order: sorted WordNet ids" in ds.describe()
    assert any("only 3 ImageNet classes" in n for n in ds.notes)  # a subset: 0..2 is not ImageNet-1k's numbering


def test_flat_images_without_labels_file_explain_the_layouts(tmp_path):
    save(tmp_path / "a.png", rgb(0))
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path)
    assert "no labels file" in str(e.value) and "class folders" in str(e.value)
    assert "CIFAR-100" in str(e.value) and "annotations/test.txt" in str(e.value)


def test_cifar100_pickles_roundtrip(tmp_path):
    """Only 'test' and 'meta' exist and their md5 sums are not the official ones: torchvision's
    CIFAR100 as such refuses both; the reader still decodes through torchvision's own code."""
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    data = np.random.default_rng(1).integers(0, 256, (6, 3072), dtype=np.uint8)
    labels = [5, 99, 0, 5, 42, 7]
    with open(d / "test", "wb") as f:
        # the official files are Python 2 pickles: their keys load as str under encoding="latin1"
        pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * 6, "filenames": ["x"] * 6}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    for root in (tmp_path, d):  # the parent folder or the pickles' folder itself
        ds = open_dataset(root, transform=eval_transform(CFG | {"input_size": [3, 32, 32]}))
        assert ds.layout == "cifar-100 (test)" and ds.num_classes == 100 and ds.labels == labels
        assert ds.classes[99] == "c99"
    for i in range(6):  # CIFAR stores planes (R..., G..., B...) row-major
        expect = data[i].reshape(3, 32, 32).transpose(1, 2, 0)
        np.testing.assert_array_equal(np.asarray(ds.load_image(i)), expect)


def test_cifar10_batches_are_rejected_with_reason(tmp_path):
    with open(tmp_path / "test", "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [0]}, f)
    with open(tmp_path / "meta", "wb") as f:
        pickle.dump({"label_names": ["a"]}, f)
    with pytest.raises(DataError, match="CIFAR-100 pickles") as e:
        open_dataset(tmp_path)
    assert "fine_label_names" in str(e.value)  # torchvision's KeyError, named


def test_cifar100_garbage_pickle_is_a_data_error(tmp_path):
    (tmp_path / "test").write_bytes(b"not a pickle")
    (tmp_path / "meta").write_bytes(b"nor this")
    with pytest.raises(DataError, match="CIFAR-100 pickles.*UnpicklingError"):
        open_dataset(tmp_path)


PETS = [("Abyssinian_1", 1), ("great_pyrenees_7", 20), ("Abyssinian_2", 1), ("yorkshire_terrier_9", 37)]


def make_pets(d: Path, lines=None):
    for i, (s, _) in enumerate(PETS[:3]):  # the last one is listed but missing
        save(d / "images" / f"{s}.jpg", rgb(i))
    (d / "annotations").mkdir()
    (d / "annotations" / "test.txt").write_text(
        lines if lines is not None else "".join(f"{s} {c} {1 if s[0].isupper() else 2} 1\n" for s, c in PETS))


@pytest.mark.parametrize("where", ["any_name", "torchvision_root", "oxford-iiit-pet"])
def test_oxford_pets(tmp_path, where):
    """The folder holding images/ + annotations/ may have any name, or be torchvision's ROOT/oxford-iiit-pet."""
    d = tmp_path / ("pets" if where == "any_name" else "oxford-iiit-pet")
    make_pets(d)
    ds = open_dataset(tmp_path if where == "torchvision_root" else d, transform=eval_transform(CFG))
    assert ds.layout == "oxford-iiit-pet (test)" and ds.root == d
    assert ds.labels == [0, 19, 0, 36] and ds.num_classes == 37  # '<class id 1..37>' - 1
    assert ds.classes[0] == "Abyssinian" and ds.classes[19] == "Great Pyrenees"  # torchvision's class names
    assert [Path(r) for r, _ in ds.items] == [d / "images" / f"{s}.jpg" for s, _ in PETS]
    assert any("1 images listed in test.txt are missing" in n for n in ds.notes)
    stats = BatchStats()
    n = sum(len(x) for x, _ in batches(ds, 8, stats=stats))
    assert n == 3 and len(stats.unreadable) == 1  # the missing file is counted, not fatal


def test_oxford_pets_bad_list_and_missing_split(tmp_path):
    make_pets(tmp_path, lines="#Image CLASS-ID SPECIES BREED ID\nAbyssinian_1 1 1 1\n")  # a header is not the format
    with pytest.raises(DataError, match="OxfordIIITPet"):
        open_dataset(tmp_path)
    (tmp_path / "annotations" / "test.txt").rename(tmp_path / "annotations" / "trainval.txt")
    with pytest.raises(DataError, match="annotations/test.txt is missing.*--split train"):
        open_dataset(tmp_path)


def test_split_folders_pick_eval_or_calibration_split(tmp_path):
    save(tmp_path / "train" / "a" / "0.png", rgb(0))
    save(tmp_path / "train" / "b" / "0.png", rgb(1))
    save(tmp_path / "test" / "a" / "1.png", rgb(2))
    save(tmp_path / "test" / "b" / "1.png", rgb(3))
    ev = open_dataset(tmp_path, prefer=EVAL_SPLITS)
    cal = open_dataset(tmp_path, prefer=CALIBRATION_SPLITS)
    assert ev.root.name == "test" and cal.root.name == "train"
    assert open_dataset(tmp_path, split="train").root.name == "train"
    assert "'test' split" in ev.notes[0]
    with pytest.raises(DataError, match="not 'val'"):
        open_dataset(tmp_path, split="val")


@pytest.mark.parametrize("case", ["missing", "empty", "file", "no_images"])
def test_bad_folders_explain_expected_layouts(tmp_path, case):
    p = tmp_path / "data"
    if case == "empty":
        p.mkdir()
    elif case == "file":
        p.write_text("x")
    elif case == "no_images":
        (p / "cls").mkdir(parents=True)
        (p / "cls" / "readme.md").write_text("hi")
    with pytest.raises(DataError) as e:
        open_dataset(p)
    msg = str(e.value)
    expected = {"missing": "does not exist", "empty": "is empty", "file": "is a file", "no_images": "no images found"}
    assert expected[case] in msg
    assert LAYOUTS in msg  # every layout error shows the layouts


def test_limit_is_deterministic_and_spread(tmp_path):
    for c in range(4):
        for j in range(25):
            (tmp_path / f"c{c}").mkdir(exist_ok=True)
            (tmp_path / f"c{c}" / f"{j:02d}.png").write_bytes(b"")  # content not read here
    full = open_dataset(tmp_path)
    a = open_dataset(tmp_path, limit=10)
    b = open_dataset(tmp_path, limit=10)
    assert a.items == b.items and len(a) == 10
    assert a.items != full.items[:10]  # not simply the first files (which are all class 0)
    assert len(set(a.labels)) > 1
    assert open_dataset(tmp_path, limit=1000).items == full.items
    with pytest.raises(DataError, match="positive"):
        open_dataset(tmp_path, limit=0)


def test_data_config_uses_the_models_real_input_size():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, patch_size=16, depth=1)
    cfg = data_config(model)
    assert cfg["input_size"] == [3, 48, 48]  # timm's pretrained config alone would say 224
    tf = eval_transform(cfg)
    x = tf(Image.fromarray(rgb(0, (100, 70))))
    assert x.shape == (3, 48, 48)


def test_cifar_calibration_uses_train_pickle_and_eval_the_test_pickle(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for split, n in (("train", 5), ("test", 3)):
        with open(d / split, "wb") as f:
            pickle.dump({"data": np.zeros((n, 3072), np.uint8), "fine_labels": list(range(n))}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    ev, cal = open_dataset(tmp_path, prefer=EVAL_SPLITS), open_dataset(tmp_path, prefer=CALIBRATION_SPLITS)
    assert (len(ev), len(cal)) == (3, 5)
    assert ev.root == cal.root and ev.layout != cal.layout  # same folder, different split
