"""`vitmerge eval` for detectors: COCO-format folders read lazily, COCO categories mapped to the model's
classes, mAP through torchmetrics, merged vs unmerged on the same images.

The expected numbers do not come from the code under test: the ground truth of each folder is written from
the unmerged detector's own detections (computed here with plain torch on the images as read back from
PNG), so the unmerged model must score mAP = 1 exactly when every step (reading, resizing, normalising,
class mapping, box scaling, decoding) is right, and less when any step is wrong; the merged model's mAP
is recomputed here from `vitmerge.apply` + a forward on the same images."""
import copy
import json

import numpy as np
import pytest
import torch

import vitmerge
from support.detection_eval import dense, png_images, resize, timm_norm, write_truth

pytest.importorskip("torchmetrics")
pytest.importorskip("pycocotools")

IMAGENET = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
DENSE_KW = '{"depth": 3}'


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _cli(*args):
    from typer.testing import CliRunner

    from vitmerge.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _map_line(report, name):
    return _report(report)["eval"]["models"][name]


def _report(path):
    return json.loads(path.read_text())["data"]


def test_dense_eval_scores_its_own_detections_1_and_the_merged_model_as_recomputed(tmp_path):
    """Ground truth = the unmerged dense detector's detections (normalised as timm's config of its backbone):
    the CLI's unmerged mAP is 1.0; the merged model's mAP and fidelity equal a recomputation with
    vitmerge.apply and torchmetrics on the same images."""
    from vitmerge.data.detection import decode_dense, mean_average_precision

    det = dense(tmp_path)
    x = png_images(tmp_path / "coco")
    mean, std = timm_norm(det)
    xn = (x - mean) / std
    with torch.no_grad():
        ref = decode_dense(*det(xn))
    assert all(len(p["boxes"]) >= 3 for p in ref)
    write_truth(tmp_path / "coco", ref, [(i, str(i)) for i in range(10)], (64, 64))
    res = _cli("eval", "dense:vit_tiny_patch16_224", "--checkpoint", tmp_path / "det.pth", "--img-size", "64",
               "--model-kwargs", DENSE_KW, "--data", tmp_path / "coco", "--r", "6,4,2", "--batch-size", "4",
               "--report-dir", tmp_path / "rep")
    assert res.exit_code == 0, res.output
    report = tmp_path / "rep" / "report.json"
    un, merged = _map_line(report, "unmerged"), _map_line(report, "merged")
    assert un["map"] == pytest.approx(1.0) and un["map_50"] == 1.0 and un["fidelity_map_50"] == 1.0

    m = copy.deepcopy(det)
    vitmerge.apply(m, "tome", [6, 4, 2])
    with torch.no_grad():
        got = decode_dense(*m(xn))
    truth = [{"boxes": p["boxes"], "labels": p["labels"]} for p in ref]
    want = mean_average_precision(got, truth)
    assert merged["map"] == pytest.approx(want["map"], abs=1e-6) and merged["map_50"] == pytest.approx(want["map_50"], abs=1e-6)
    assert merged["map"] < 1.0  # merging a random detector changes its detections: the test can tell them apart
    def top(preds, ks):  # each image's k most confident detections
        return [{key: v[p["scores"].argsort(descending=True)[:k]] for key, v in p.items()} for p, k in zip(preds, ks)]

    ks = [len(p["boxes"]) for p in ref]  # every reference detection is ground truth here
    fid = mean_average_precision(top(got, ks), top(ref, ks))["map_50"]
    assert merged["fidelity_map_50"] == pytest.approx(fid, abs=1e-6)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "mAP@[.5:.95]" in md and "category id = class index" in md and "timm config" in md

    # --no-normalize feeds [0, 1] pixels: a different input, so no longer the ground truth's detections
    res = _cli("eval", "dense:vit_tiny_patch16_224", "--checkpoint", tmp_path / "det.pth", "--img-size", "64",
               "--model-kwargs", DENSE_KW, "--data", tmp_path / "coco", "--no-normalize", "--r", "0",
               "--report-dir", tmp_path / "raw")
    assert res.exit_code == 0, res.output
    assert _map_line(tmp_path / "raw" / "report.json", "unmerged")["map"] < 0.9


@pytest.mark.slow
def test_dense_eval_in_onnx_runtime_matches_pytorch(tmp_path):
    """--runtime ort: both models exported, verified, scored in ONNX Runtime; mAP as in PyTorch."""
    det = dense(tmp_path)
    x = png_images(tmp_path / "coco", n=4)
    from vitmerge.data.detection import decode_dense

    with torch.no_grad():
        mean, std = timm_norm(det)
        ref = decode_dense(*det((x - mean) / std))
    write_truth(tmp_path / "coco", ref, [(i, str(i)) for i in range(10)], (64, 64))
    out = {}
    for rt in ("torch", "ort"):
        res = _cli("eval", "dense:vit_tiny_patch16_224", "--checkpoint", tmp_path / "det.pth", "--img-size", "64",
                   "--model-kwargs", DENSE_KW, "--data", tmp_path / "coco", "--r", "6,4,2", "--runtime", rt,
                   "--report-dir", tmp_path / rt)
        assert res.exit_code == 0, res.output
        out[rt] = _report(tmp_path / rt / "report.json")["eval"]["models"]
    for name in ("unmerged", "merged"):
        assert out["ort"][name]["map"] == pytest.approx(out["torch"][name]["map"], abs=2e-3)


def test_yolos_eval_maps_categories_by_name_and_resizes_to_its_input(tmp_path):
    """A YOLOS folder (input 32 x 48, not square; class names in id2label) on 64 x 64 images whose COCO ids
    are in another order than the model's classes: auto maps by name and scores its own detections 1.0;
    forcing --class-map order (id order, the wrong map here) scores less."""
    pytest.importorskip("transformers")
    from support.reference_yolos import make_yolos

    from vitmerge.data.detection import decode_yolos

    names = ["cat", "dog", "bird", "fish"]
    model = make_yolos(False, seed=2, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    model.save_pretrained(tmp_path / "yolos")
    x = png_images(tmp_path / "coco", n=5)
    with torch.no_grad():
        out = model(pixel_values=(resize(x, (32, 48)) - IMAGENET[0]) / IMAGENET[1])
    ref = decode_yolos(out.logits, out.pred_boxes)
    coco_ids = {"bird": 2, "cat": 5, "dog": 11, "fish": 20}  # id order: bird, cat, dog, fish != model order
    write_truth(tmp_path / "coco", ref, [(coco_ids[n], n) for n in names], (64, 64))
    for cmap, check in (("auto", lambda m: m == pytest.approx(1.0)), ("order", lambda m: m < 0.9)):
        res = _cli("eval", tmp_path / "yolos", "--data", tmp_path / "coco", "--r", "4,2,2", "--class-map", cmap,
                   "--report-dir", tmp_path / cmap)
        assert res.exit_code == 0, res.output
        rep = _report(tmp_path / cmap / "report.json")
        assert check(rep["eval"]["models"]["unmerged"]["map"]), (cmap, rep["eval"]["models"])
        assert rep["task"] == "detection" and rep["eval"]["images"] == 5
    assert any("names" in n for n in _report(tmp_path / "auto" / "report.json")["eval"]["notes"])


def test_coco_folder_class_maps_and_layouts(tmp_path):
    """Category id -> class index under each map, with COCO's own layout (instances JSON elsewhere, file
    names relative to the image folder), --limit and errors that name the way out."""
    from vitmerge.data.detection import CocoFolder
    from vitmerge.errors import DataError

    root = tmp_path / "val2017"
    root.mkdir()
    from PIL import Image

    for i in range(4):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(root / f"{i:03d}.jpg")
    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
    anns = [{"id": k, "image_id": k % 4, "category_id": [1, 3, 18][k % 3], "bbox": [3, 4, 6, 8], "iscrowd": k == 5}
            for k in range(6)]
    ann = tmp_path / "instances_val.json"
    ann.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i:03d}.jpg"} for i in range(4)],
                               "annotations": anns, "categories": cats}))
    order = CocoFolder(root, ann, size=(8, 12), class_map="order", num_classes=3)
    assert order.index == {1: 0, 3: 1, 18: 2}
    by_id = CocoFolder(root, ann, class_map="auto", num_classes=91)  # COCO-trained DETR/YOLOS: 91 classes
    assert by_id.index == {1: 1, 3: 3, 18: 18}
    names = ["N/A", "dog", "car", "tree", "person"]
    by_name = CocoFolder(root, ann, class_map="auto", num_classes=5, class_names=names)
    assert by_name.index == {1: 4, 3: 2, 18: 1}
    assert CocoFolder(root, ann, class_map="auto", num_classes=3).index == {1: 0, 3: 1, 18: 2}  # 18 >= 3: order

    t = order.target(1)  # annotations 1 and 5 of image 1 (30 x 20 pixels)
    torch.testing.assert_close(t["boxes"], torch.tensor([[6 / 30, 8 / 20, 6 / 30, 8 / 20]] * 2))
    assert t["labels"].tolist() == [1, 2] and t["iscrowd"].tolist() == [0, 1]
    img, i, wh = order[1]
    assert img.shape == (3, 8, 12) and i == 1 and wh == (30, 20)
    assert torch.allclose(img, torch.full_like(img, 40 / 255), atol=2 / 255)  # JPEG of a flat colour
    assert len(CocoFolder(root, ann, limit=2)) == 2

    with pytest.raises(DataError, match="class map id or order"):
        CocoFolder(root, ann, class_map="name", num_classes=5, class_names=["dog", "car"])
    with pytest.raises(DataError, match="class map order"):
        CocoFolder(root, ann, class_map="id", num_classes=10)
    with pytest.raises(DataError, match="3 categories but the model has 2"):
        CocoFolder(root, ann, class_map="order", num_classes=2)
    with pytest.raises(DataError, match="--labels"):
        CocoFolder(root)  # no annotations.json in the image folder
    (root / "002.jpg").unlink()
    with pytest.raises(DataError, match="002.jpg"):
        CocoFolder(root, ann)


def test_unreadable_image_is_skipped_and_reported(tmp_path):
    from vitmerge.data.detection import CocoFolder

    png_images(tmp_path / "coco", n=3)
    (tmp_path / "coco" / "images" / "000001.png").write_bytes(b"not a png")
    bad = []
    data = CocoFolder(tmp_path / "coco", size=(16, 16))
    got = [(x.shape[0], idx) for x, _, idx in data.batches(2, unreadable=bad)]
    assert got == [(1, [0]), (1, [2])] and bad == [str(tmp_path / "coco" / "images" / "000001.png")]


def test_eval_detector_bad_inputs(tmp_path):
    dense(tmp_path)
    base = ["eval", "dense:vit_tiny_patch16_224", "--checkpoint", tmp_path / "det.pth", "--img-size", "64",
            "--model-kwargs", DENSE_KW]
    res = _cli(*base, "--data", tmp_path / "nowhere")
    assert res.exit_code == 2 and "nowhere" in res.output
    (tmp_path / "imgs").mkdir()
    res = _cli(*base, "--data", tmp_path / "imgs")
    assert res.exit_code == 2 and "annotations.json" in " ".join(res.output.split())
    png_images(tmp_path / "coco", n=2)
    res = _cli(*base, "--data", tmp_path / "coco", "--split", "val")
    assert res.exit_code == 2 and "COCO-format" in " ".join(res.output.split())
    res = _cli(*base, "--data", tmp_path / "coco", "--class-map", "name")  # a dense detector names no classes
    assert res.exit_code == 2 and "class names" in " ".join(res.output.split())
    res = _cli("eval", "vit_tiny_patch16_224", "--img-size", "32", "--model-kwargs", '{"depth": 1}', "--data",
               tmp_path / "coco", "--no-normalize")  # a classifier: detector-only options are refused, not ignored
    assert res.exit_code == 2 and "apply to detectors" in " ".join(res.output.split())
