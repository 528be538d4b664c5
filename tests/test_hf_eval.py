"""`vitmerge eval` and `vitmerge profile` on transformers folders with video (.npy) and audio (.wav) clip folders."""
import json
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("transformers")

from vitmerge.cli import app  # noqa: E402
from vitmerge.data import audio, clips, synthetic  # noqa: E402

from support.hf_models import make  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def video(tmp_path_factory, one_torch_thread):
    """A tiny VideoMAE folder (4 frames of 32 px, no preprocessor_config: ImageNet mean/std) and 12 clips."""
    root = tmp_path_factory.mktemp("video")
    make("videomae").save_pretrained(root / "model")
    data, labels = synthetic.moving_digits(range(12), frames=4, size=32, digit_size=12, seed=0)
    labels = labels % 5  # the tiny model has 5 classes
    clips.write_video_folder(root / "data", data, labels, [str(c) for c in range(5)])
    return root, data, labels


@pytest.fixture(scope="module")
def sound(tmp_path_factory, one_torch_thread):
    """A tiny AST folder (48 frames x 32 mel bins) with its preprocessor_config, and 10 WAV files."""
    root = tmp_path_factory.mktemp("audio")
    make("ast").save_pretrained(root / "model")
    pre = {"feature_extractor_type": "ASTFeatureExtractor", "sampling_rate": 16000, "num_mel_bins": 32,
           "max_length": 48, "mean": -6.0, "std": 3.0, "do_normalize": True}
    (root / "model" / "preprocessor_config.json").write_text(json.dumps(pre))
    waves, keys = synthetic.dtmf(10, seconds=0.5, seed=0)
    keys = keys % 5
    clips.write_audio_folder(root / "data", waves, keys, synthetic.DTMF_KEYS[:5], 16000)
    return root, waves, keys


def _top1(res) -> dict:
    """model name -> top-1 (%) from the eval table."""
    out = {}
    for line in res.output.splitlines():
        m = re.match(r"\s*(unmerged|merged)\s+([\d.]+)%", line.replace("│", " "))
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def test_eval_video_folder_scores_like_a_plain_computation(video):
    root, data, labels = video
    res = runner.invoke(app, ["eval", str(root / "model"), "--data", str(root / "data"), "--r", "8"])
    assert res.exit_code == 0, res.output
    top1 = _top1(res)
    # independently: transformers' own model on the clips preprocessed by hand (ImageNet mean/std, 3 channels)
    import transformers

    plain = transformers.VideoMAEForVideoClassification.from_pretrained(str(root / "model")).eval()
    x = torch.from_numpy(data).float().div(255)[:, :, None].expand(-1, -1, 3, -1, -1)
    mean, std = torch.tensor(clips.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(clips.IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        pred = plain((x - mean) / std).logits.argmax(-1).numpy()
    # the folder's classes are sorted by name, the order of the labels written
    assert top1["unmerged"] == pytest.approx(100 * float((pred == labels).mean()), abs=0.01)
    assert "merged" in top1 and "32 -> 16" in " ".join(res.output.split())


def test_eval_audio_folder_scores_like_a_plain_computation(sound):
    root, waves, keys = sound
    res = runner.invoke(app, ["eval", str(root / "model"), "--data", str(root / "data"), "--r", "6", "-m", "hash"])
    assert res.exit_code == 0, res.output
    import transformers

    plain = transformers.ASTForAudioClassification.from_pretrained(str(root / "model")).eval()
    pcm = audio.to_pcm16(waves).astype(np.float32) / 32768.0  # what the WAV files hold
    feats = torch.stack([torch.from_numpy(audio.ast_features(w, 16000, 32, 48, -6.0, 3.0)) for w in pcm])
    with torch.no_grad():
        pred = plain(feats).logits.argmax(-1).numpy()
    # classes are the folder names sorted: DTMF_KEYS[:5] are already in sorted order
    assert _top1(res)["unmerged"] == pytest.approx(100 * float((pred == keys).mean()), abs=0.01)


def test_eval_wrong_frame_count_is_a_clear_error(video, tmp_path):
    root, _, _ = video
    data, labels = synthetic.moving_digits(range(2), frames=6, size=32, digit_size=12, seed=0)
    clips.write_video_folder(tmp_path / "six", data, labels % 5, [str(c) for c in range(5)])
    res = runner.invoke(app, ["eval", str(root / "model"), "--data", str(tmp_path / "six")])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "6 frames and the model takes 4" in text and "--frames 6" in text, res.output
    # and the fix works: the model loaded for 6 frames (VideoMAE's positions follow the frame count)
    res = runner.invoke(app, ["eval", str(root / "model"), "--data", str(tmp_path / "six"), "--frames", "6"])
    assert res.exit_code == 0, res.output


def test_profile_takes_a_folder(sound):
    root, _, _ = sound
    res = runner.invoke(app, ["profile", str(root / "model"), "--r", "4", "--batch", "1", "--rounds", "1", "--iters",
                              "1", "--warmup", "0", "--no-energy"])
    assert res.exit_code == 0, res.output
    assert "tome r=4" in res.output and "torch/cpu" in res.output
    res = runner.invoke(app, ["profile", str(root / "model"), "--runtime", "ort", "--no-energy"])
    assert res.exit_code == 2 and "export it first" in " ".join(res.output.split())
