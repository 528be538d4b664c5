"""The digits ViT: a real (small) measurement of what merging costs in accuracy."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import vitmerge
from vitmerge.demo import digits
from vitmerge.data import open_dataset, transform_for
from vitmerge.models.budget import achieved_fraction, budget_schedule


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def test_images(digits_model):
    from support.plain_digits import load_digit_pngs

    x, y = load_digit_pngs(digits_model.test_dir)
    return torch.from_numpy(x), torch.from_numpy(y)


@pytest.fixture(scope="module")
def model(digits_model):
    return digits_model.build()


def top1(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def test_files_and_split(digits_model):
    meta = json.loads(digits_model.config_path.read_text())
    assert meta["model"] == "vit_tiny_patch16_224" and meta["kwargs"]["patch_size"] == 4
    kwargs_file = json.loads((digits_model.dir / "model_kwargs.json").read_text())
    assert kwargs_file == meta["kwargs"]  # usable as --model-kwargs for the other commands
    train = {p.name for p in digits_model.train_dir.rglob("*.png")}
    test = {p.name for p in digits_model.test_dir.rglob("*.png")}
    assert len(train) + len(test) == 1797 and not train & test  # file name = digit index: disjoint
    assert len(test) == meta["split"]["test"] == 449


def test_unmerged_accuracy_is_high_and_matches_the_recorded_metric(model, test_images, digits_model):
    x, y = test_images
    acc = top1(model, x, y)
    assert acc > 0.9, f"digits ViT test top-1 {acc:.3f}"
    assert acc == pytest.approx(digits_model.test_top1, abs=1e-6)  # PNG round trip is lossless


def test_image_folder_gives_the_training_tensors_exactly(model, digits_model):
    ds = open_dataset(digits_model.data_dir, transform=transform_for(model))  # picks the test split
    assert ds.root == digits_model.test_dir
    u8, _ = digits.load_arrays()
    idx = [int(ref.rsplit("/", 1)[1][:-4]) for ref, _ in ds.items[::37]]
    got = torch.stack([ds[i][0] for i in range(0, len(ds), 37)])
    assert torch.equal(got, digits.to_tensor(u8[idx]))


def test_r0_is_exactly_the_unmerged_model(model, test_images):
    x, _ = test_images
    merged = vitmerge.apply(copy.deepcopy(model), method="tome", r=0)
    with torch.no_grad():
        assert torch.equal(merged(x[:64]), model(x[:64]))


def test_tome_at_three_quarters_of_the_flops_keeps_accuracy(model, test_images):
    x, y = test_images
    merged = copy.deepcopy(model)
    rs = budget_schedule(merged, 0.75, "tome")
    vitmerge.apply(merged, method="tome", r=rs)
    frac = achieved_fraction(merged)
    assert 0.70 <= frac <= 0.7501, (rs, frac)
    assert merged.vitmerge.tokens_out[-1] < 65
    base, acc = top1(model, x, y), top1(merged, x, y)
    assert acc >= base - 0.03, f"tome at {frac:.3f} FLOPs: {acc:.3f} vs unmerged {base:.3f}"


def test_cache_is_reused_and_keyed_by_configuration(digits_model):
    again = digits.train(digits_model.dir)  # same configuration: no training
    assert again.cached and again.checkpoint == digits_model.checkpoint
    other = digits.DigitsConfig()
    other.train["epochs"] += 1
    assert other.hash != digits.DigitsConfig().hash
    assert digits.load(digits_model.config_path).kwargs == digits_model.kwargs


def test_digits_cli_reuses_a_trained_folder(digits_model, tmp_path):
    from typer.testing import CliRunner

    from vitmerge.cli import app

    res = CliRunner().invoke(app, ["digits", "train", "-o", str(digits_model.dir)])
    assert res.exit_code == 0, res.output
    assert "reused" in res.output and f"{digits_model.test_top1:.2%}" in res.output
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    res = CliRunner().invoke(app, ["digits", "train", "-o", str(blocker)])
    assert res.exit_code == 2 and "not a folder" in res.output
