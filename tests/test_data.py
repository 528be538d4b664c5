"""Dataset loaders on tiny layouts built here: ImageFolder, ImageNet flat + labels, CIFAR-100, Pets."""
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
    (tmp_path / "empty_dir").mkdir()

    ds = open_dataset(tmp_path, transform=eval_transform(CFG))
    assert ds.layout == "imagefolder"
    assert ds.classes == ["ant", "bee", "cat"]
    assert len(ds) == 7  # 6 images + the broken one; the .txt is not an image
    assert any("hold no images" in n for n in ds.notes)

    stats = BatchStats()
    xs, ys = zip(*batches(ds, batch_size=3, stats=stats))
    x, y = torch.cat(xs), torch.cat(ys)
    assert len(stats.unreadable) == 1 and stats.unreadable[0].endswith("broken.jpg")
    assert stats.seen == 7 and len(x) == 6
    readable = [(ref, lab) for ref, lab in ds.items if not ref.endswith("broken.jpg")]
    for i, (ref, lab) in enumerate(readable):
        assert int(y[i]) == lab == ["ant", "bee", "cat"].index(ref.split("/")[-2])
        torch.testing.assert_close(x[i], reference_tensor(arrays[Path(ref)]), atol=1e-6, rtol=0)


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
    assert any("no entry" in n for n in ds.notes) and any("no image file" in n for n in ds.notes)

    # Kaggle's LOC_val_solution.csv: synset ids; class index = position in sorted synsets
    (tmp_path / "val.txt").unlink()
    synsets = ["n00000002", "n00000001", "n00000003", "n00000001", "n00000002"]
    rows = ["ImageId,PredictionString"] + [f"{n[:-5]},{s} 1 2 3 4 {s} 5 6 7 8" for n, s in zip(names, synsets)]
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    ds = open_dataset(tmp_path)
    assert ds.classes == ["n00000001", "n00000002", "n00000003"]
    assert ds.labels == [1, 0, 2, 0, 1]


def test_flat_images_without_labels_file_explain_the_layouts(tmp_path):
    save(tmp_path / "a.png", rgb(0))
    with pytest.raises(DataError) as e:
        open_dataset(tmp_path)
    assert "no labels file" in str(e.value) and "class folders" in str(e.value)
    assert "CIFAR-100" in str(e.value) and "annotations/test.txt" in str(e.value)


def test_cifar100_pickles_roundtrip(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    data = np.random.default_rng(1).integers(0, 256, (6, 3072), dtype=np.uint8)
    labels = [5, 99, 0, 5, 42, 7]
    with open(d / "test", "wb") as f:
        pickle.dump({b"data": data, b"fine_labels": labels, b"filenames": [b"x"] * 6}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)
    for root in (tmp_path, d):  # the parent folder or the pickles' folder itself
        ds = open_dataset(root, transform=eval_transform(CFG | {"input_size": [3, 32, 32]}))
        assert ds.layout == "cifar-100 (test)" and ds.num_classes == 100 and ds.labels == labels
        assert ds.classes[99] == "c99"
    for i in range(6):  # CIFAR stores planes (R..., G..., B...) row-major
        expect = data[i].reshape(3, 32, 32).transpose(1, 2, 0)
        np.testing.assert_array_equal(np.asarray(ds.load_image(i)), expect)


def test_cifar10_batches_are_rejected_with_reason(tmp_path):
    with open(tmp_path / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, f)
    with open(tmp_path / "meta", "wb") as f:
        pickle.dump({b"label_names": [b"a"]}, f)
    with pytest.raises(DataError, match="CIFAR-100 pickles"):
        open_dataset(tmp_path)


def test_oxford_pets(tmp_path):
    stems = [("Abyssinian_1", 1), ("great_pyrenees_7", 20), ("Abyssinian_2", 1), ("yorkshire_terrier_9", 37)]
    for i, (s, _) in enumerate(stems[:3]):  # the last one is listed but missing
        save(tmp_path / "images" / f"{s}.jpg", rgb(i))
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "test.txt").write_text(
        "#Image CLASS-ID SPECIES BREED ID\n" + "\n".join(f"{s} {c} 1 1" for s, c in stems) + "\n")
    ds = open_dataset(tmp_path, transform=eval_transform(CFG))
    assert ds.layout == "oxford-iiit-pet (test)"
    assert ds.labels == [0, 19, 0, 36] and ds.num_classes == 37
    assert ds.classes[0] == "Abyssinian" and ds.classes[19] == "great_pyrenees"
    assert any("missing" in n for n in ds.notes)
    stats = BatchStats()
    n = sum(len(x) for x, _ in batches(ds, 8, stats=stats))
    assert n == 3 and len(stats.unreadable) == 1  # the missing file is counted, not fatal


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
            pickle.dump({b"data": np.zeros((n, 3072), np.uint8), b"fine_labels": list(range(n))}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)
    ev, cal = open_dataset(tmp_path, prefer=EVAL_SPLITS), open_dataset(tmp_path, prefer=CALIBRATION_SPLITS)
    assert (len(ev), len(cal)) == (3, 5)
    assert ev.root == cal.root and ev.layout != cal.layout  # same folder, different split
