"""The MNIST / Fashion-MNIST IDX layout of ``open_dataset`` (vitmerge/data/idx.py), on IDX files written
here (gzipped and not), so no Debian package or download is needed."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vitmerge.data import CALIBRATION_SPLITS, EVAL_SPLITS, LAYOUTS, batches, open_dataset, transform_for
from vitmerge.data import idx
from vitmerge.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    """An IDX file as LeCun's format (and torchvision's reader) defines it, written independently of the reader."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()


def write(path: Path, data: bytes, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_set(d: Path, n_train: int = 12, n_test: int = 7, shape=(6, 5), gz=True, seed: int = 0, skip=()):
    """Random images [N, rows, cols] and labels 0..9 for both splits in ``d``; returns the arrays."""
    rng = np.random.RandomState(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.randint(0, 256, size=(n, *shape)).astype(np.uint8)
        y = rng.randint(0, 10, size=n).astype(np.uint8)
        arrays[split] = (x, y)
        img_name, lab_name = idx.SPLIT_FILES[split]
        if img_name not in skip:
            write(d / img_name, idx_bytes(x, idx.IMAGES_MAGIC), gz)
        if lab_name not in skip:
            write(d / lab_name, idx_bytes(y, idx.LABELS_MAGIC), gz)
    return arrays


def pixels(ds, i: int) -> np.ndarray:
    img = ds.load_image(i)
    assert img is not None and img.mode == "RGB"
    a = np.asarray(img)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()  # grey replicated
    return a[..., 0]


@pytest.mark.parametrize("gz", [True, False])
def test_images_and_labels_round_trip_exactly(tmp_path, gz):
    d = tmp_path / "fashion-mnist"
    arrays = make_set(d, gz=gz)
    for split, prefer in (("test", EVAL_SPLITS), ("train", CALIBRATION_SPLITS)):
        ds = open_dataset(d, prefer=prefer)
        x, y = arrays[split]
        assert ds.layout == f"fashion-mnist idx ({split})" and len(ds) == len(y)
        assert ds.labels == y.tolist()
        assert ds.load_image(0).size == (5, 6)  # PIL: (width = cols, height = rows)
        for i in range(len(ds)):
            assert np.array_equal(pixels(ds, i), x[i])
        assert ds.items[0][0] == 0  # items reference the index into the file


def test_same_arrays_as_torchvisions_reader(tmp_path):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    d = tmp_path / "mnist"
    make_set(d, gz=False, shape=(28, 28))
    for split, (img_name, lab_name) in idx.SPLIT_FILES.items():
        assert np.array_equal(idx.read_idx(d / img_name, idx.IMAGES_MAGIC), read_image_file(str(d / img_name)).numpy())
        assert np.array_equal(idx.read_idx(d / lab_name, idx.LABELS_MAGIC), read_label_file(str(d / lab_name)).numpy())


def test_mixed_gz_and_plain_files_and_plain_wins(tmp_path):
    d = tmp_path / "fm"
    arrays = make_set(d, gz=True)
    x, y = arrays["test"]
    plain = x.copy()
    plain[0] = 255 - plain[0]
    write(d / "t10k-images-idx3-ubyte", idx_bytes(plain, idx.IMAGES_MAGIC), gz=False)  # beside the .gz
    ds = open_dataset(d)
    assert np.array_equal(pixels(ds, 0), plain[0])
    # a gzipped file without the .gz name is still read
    (d / "t10k-images-idx3-ubyte").write_bytes(gzip.compress(idx_bytes(x, idx.IMAGES_MAGIC)))
    assert np.array_equal(pixels(open_dataset(d), 0), x[0])


def test_split_selection(tmp_path):
    d = tmp_path / "fashion"
    arrays = make_set(d)
    ev, cal = open_dataset(d, prefer=EVAL_SPLITS), open_dataset(d, prefer=CALIBRATION_SPLITS)
    assert (len(ev), len(cal)) == (7, 12)
    assert ev.root == cal.root and ev.layout != cal.layout  # calibrate keeps its eval set apart by layout
    assert any("'test' split" in n for n in ev.notes)
    assert len(open_dataset(d, split="train")) == 12
    assert open_dataset(d, split="test", prefer=CALIBRATION_SPLITS).labels == arrays["test"][1].tolist()
    val = open_dataset(d, split="val")
    assert len(val) == 7 and any("no 'val' split" in n for n in val.notes)
    with pytest.raises(DataError, match="'train' and 'test', not 'dev'"):
        open_dataset(d, split="dev")


def test_one_complete_split_is_enough_unless_the_other_is_asked(tmp_path):
    d = tmp_path / "fashion"
    make_set(d, skip=idx.SPLIT_FILES["train"])
    assert len(open_dataset(d, prefer=CALIBRATION_SPLITS)) == 7  # calibration falls back to test
    assert any("only the 'test' split" in n for n in open_dataset(d).notes)
    with pytest.raises(DataError) as e:
        open_dataset(d, split="train")
    msg = str(e.value)
    assert "train-images-idx3-ubyte or train-labels-idx1-ubyte" in msg
    assert all(n in msg for n in idx.FILE_NAMES)


@pytest.mark.parametrize("name, fashion", [("fashion-mnist", True), ("Fashion_MNIST_data", True),
                                           ("mnist", False), ("data", False)])
def test_class_names_follow_the_folder_name(tmp_path, name, fashion):
    d = tmp_path / name
    make_set(d)
    ds = open_dataset(d)
    want = list(idx.FASHION_CLASSES) if fashion else [str(i) for i in range(10)]
    assert ds.classes == want and ds.num_classes == 10
    assert ds.layout.startswith("fashion-mnist idx" if fashion else "mnist idx")
    assert fashion or not any("'fashion'" in n for n in ds.notes)  # the note is for full-size MNIST sets only


def test_torchvision_download_folders(tmp_path):
    arrays = make_set(tmp_path / "FashionMNIST" / "raw", gz=False)
    ds = open_dataset(tmp_path)
    assert ds.classes[0] == "T-shirt/top" and ds.labels == arrays["test"][1].tolist()
    make_set(tmp_path / "MNIST" / "raw")
    with pytest.raises(DataError, match="IDX files in 2 folders"):
        open_dataset(tmp_path)
    assert open_dataset(tmp_path / "MNIST" / "raw").classes[1] == "1"


def test_limit_and_batches(tmp_path):
    import timm

    d = tmp_path / "fashion-mnist"
    arrays = make_set(d, n_test=40, shape=(28, 28))
    a, b = open_dataset(d, limit=10), open_dataset(d, limit=10)
    assert len(a) == 10 and a.items == b.items and any("subset of 10 of 40" in n for n in a.notes)
    x, y = arrays["test"]
    assert [lab for _, lab in a.items] == [int(y[i]) for i, _ in a.items]
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=10)
    ds = open_dataset(d, transform=transform_for(model), limit=10)
    xb, yb = next(batches(ds, batch_size=4))
    assert xb.shape == (4, 3, 32, 32) and yb.tolist() == ds.labels[:4]


def test_more_than_ten_labels_are_named_by_index(tmp_path):
    d = tmp_path / "emnist"
    make_set(d)
    x = np.zeros((3, 4, 4), np.uint8)
    write(d / "t10k-images-idx3-ubyte", idx_bytes(x, idx.IMAGES_MAGIC), gz=True)
    write(d / "t10k-labels-idx1-ubyte", idx_bytes(np.array([0, 11, 3]), idx.LABELS_MAGIC), gz=True)
    ds = open_dataset(d)
    assert ds.num_classes == 12 and ds.classes[10:] == ["10", "11"]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def error(d: Path, **kw) -> str:
    with pytest.raises(DataError) as e:
        open_dataset(d, **kw)
    return str(e.value)


def test_a_missing_file_names_the_expected_files(tmp_path):
    d = tmp_path / "fashion-mnist"
    make_set(d, skip=("train-labels-idx1-ubyte",))
    msg = error(d)  # even when only the test split is asked: a half split is a broken copy
    assert "has train-images-idx3-ubyte.gz but not train-labels-idx1-ubyte" in msg
    assert all(n in msg for n in idx.FILE_NAMES) and ".gz" in msg


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_files(tmp_path, gz):
    d = tmp_path / "fashion-mnist"
    arrays = make_set(d, gz=gz)
    full = idx_bytes(arrays["test"][0], idx.IMAGES_MAGIC)
    f = write(d / "t10k-images-idx3-ubyte", full[:-7], gz)
    msg = error(d)
    assert "truncated" in msg and str(f) in msg and "210 bytes of data, the file holds 203" in msg
    write(d / "t10k-images-idx3-ubyte", full[:10], gz)  # inside the header
    assert "shorter than its 16-byte header" in error(d)
    write(d / "t10k-images-idx3-ubyte", full + b"\0", gz)
    assert "extra bytes" in error(d)
    write(d / "t10k-images-idx3-ubyte", b"\0\0", gz)
    assert "shorter than the 4-byte magic number" in error(d)
    if gz:  # a download cut short: the gzip stream itself ends early
        (d / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(full)[:-20])
        assert "damaged gzip file" in error(d)


def test_wrong_magic(tmp_path):
    d = tmp_path / "fashion-mnist"
    arrays = make_set(d, gz=False)
    x, y = arrays["test"]
    (d / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(y, idx.LABELS_MAGIC))  # names swapped
    (d / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(x, idx.IMAGES_MAGIC))
    msg = error(d)
    assert "magic number 2049" in msg and "expected IDX images (magic 2051)" in msg and "swapped" in msg
    (d / "t10k-images-idx3-ubyte").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    msg = error(d)
    assert "magic number 2303741511" in msg and "not an IDX file" in msg
    (d / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(x, idx.IMAGES_MAGIC))
    (d / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(y[:-1], idx.LABELS_MAGIC))
    assert "holds 7 images but t10k-labels-idx1-ubyte holds 6 labels" in error(d)
    (d / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(y, idx.LABELS_MAGIC))
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(idx_bytes(y, idx.LABELS_MAGIC))
    assert len(open_dataset(d)) == 7  # the plain file is read
    (d / "t10k-labels-idx1-ubyte").unlink()
    assert "named .gz but is not gzip-compressed" in error(d)


def test_labels_option_is_refused(tmp_path):
    d = tmp_path / "fashion-mnist"
    make_set(d)
    (d / "val.txt").write_text("x 1\n")
    assert "--labels does not apply" in error(d, labels=d / "val.txt")


def test_the_layout_is_listed_in_errors_and_docs():
    assert "MNIST / Fashion-MNIST (IDX files)" in LAYOUTS and "t10k" in LAYOUTS
    doc = (ROOT / "docs" / "data.md").read_text()
    assert "MNIST / Fashion-MNIST" in doc and "{train,t10k}-images-idx3-ubyte" in doc and "dataset-fashion-mnist" in doc


def test_eval_cli_on_an_idx_folder(tmp_path):
    from vitmerge.cli import app

    d = tmp_path / "fashion-mnist"
    make_set(d, n_train=5, n_test=30, shape=(28, 28))
    rep = tmp_path / "rep"
    res = CliRunner().invoke(app, ["eval", "vit_tiny_patch16_224", "--img-size", "32", "--model-kwargs",
                                   json.dumps({"depth": 1, "num_classes": 10}), "--r", "0", "--limit", "20",
                                   "--data", str(d), "--report-dir", str(rep)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    out = " ".join(res.output.split())
    assert "fashion-mnist idx (test): 20 images, 10 classes" in out
    ev = json.loads((rep / "report.json").read_text())["data"]["eval"]
    assert ev["images"] == 20 and ev["unreadable_count"] == 0


# --------------------------------------------------------------------------------------------
# bench/fashion_mnist.py on generated files (the real data set is never needed here)
# --------------------------------------------------------------------------------------------


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_fashion_mnist", ROOT / "bench" / "fashion_mnist.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_says_how_to_install_the_data(tmp_path):
    bench = _bench()
    with pytest.raises(SystemExit) as e:
        bench.main(["--data", str(tmp_path / "nowhere"), "--cache", str(tmp_path / "cache")])
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "/usr/share/datasets/fashion-mnist" in msg
    make_set(tmp_path / "mnist", shape=(28, 28))
    with pytest.raises(SystemExit, match="does not contain 'fashion'"):
        bench.main(["--data", str(tmp_path / "mnist"), "--cache", str(tmp_path / "cache")])


def test_bench_trains_once_and_writes_a_model_json_eval_reads(tmp_path, capsys):
    from vitmerge.models.build import load_model_config

    bench = _bench()
    d = tmp_path / "fashion-mnist"
    make_set(d, n_train=40, n_test=30, shape=(28, 28))
    args = ["--data", str(d), "--cache", str(tmp_path / "cache"), "--epochs", "1", "--depth", "1",
            "--embed-dim", "16", "--batch-size", "16"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "training" in out and "test top-1" in out and "on 30 images (50 tokens" in out
    (cfg_path,) = (tmp_path / "cache").glob("vit-*/model.json")
    cfg = load_model_config(cfg_path)
    assert cfg.data_dir == d.resolve() and cfg.checkpoint.is_file() and cfg.kwargs["patch_size"] == 4
    assert cfg.meta["classes"][0] == "T-shirt/top" and cfg.meta["split"] == {"train": 40, "test": 30, "seed": 0}
    assert bench.main(args) == 0 and "cached:" in capsys.readouterr().out  # a second run trains nothing
