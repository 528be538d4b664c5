"""Video and audio data: AST's log-mel features against transformers' own extractor, WAV files against
scipy's reader, the generated moving digits and DTMF tones against what they must contain, and clip
folders through open_dataset."""
import numpy as np
import pytest
import torch

from vitmerge.data import audio, clips, open_dataset, synthetic
from vitmerge.errors import DataError


# ------------------------------------------------------------------------------------------------- audio


@pytest.mark.parametrize("mel,length,seconds", [(128, 1024, 2.0), (64, 128, 1.28), (32, 40, 0.3)])
def test_ast_features_equal_transformers_extractor(mel, length, seconds):
    tf = pytest.importorskip("transformers")
    rng = np.random.default_rng(mel)
    t = np.arange(int(16000 * seconds)) / 16000
    w = (0.4 * np.sin(2 * np.pi * 941 * t) + 0.1 * rng.standard_normal(t.size)).astype(np.float32)
    ext = tf.ASTFeatureExtractor(num_mel_bins=mel, max_length=length)
    if not hasattr(ext, "mel_filters"):
        pytest.skip("transformers uses torchaudio's Kaldi fbank here, not its numpy path")
    ref = ext(w, sampling_rate=16000, return_tensors="np")["input_values"][0]
    ours = audio.ast_features(w, 16000, mel, length)
    assert ours.shape == ref.shape == (length, mel)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_mel_filters_equal_transformers_and_peak_at_their_centres():
    from transformers.audio_utils import mel_filter_bank

    ref = mel_filter_bank(num_frequency_bins=257, num_mel_filters=40, min_frequency=20, max_frequency=8000,
                          sampling_rate=16000, norm=None, mel_scale="kaldi", triangularize_in_mel_space=True)
    ours = audio.mel_filters(40)
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    # independent check: filter k peaks at the FFT bin whose Kaldi mel is nearest its centre
    centres = np.linspace(audio.kaldi_mel(20), audio.kaldi_mel(8000), 42)[1:-1]
    bin_mels = 1127 * np.log(1 + (16000 / 512) * np.arange(257) / 700)
    assert (ours.argmax(0) == np.abs(bin_mels[:, None] - centres[None]).argmin(0)).all()


def test_log_mel_of_a_tone_peaks_in_its_band():
    t = np.arange(16000) / 16000
    fb = audio.log_mel(0.5 * np.sin(2 * np.pi * 1000 * t), 16000, 64)
    assert fb.shape == (1 + (16000 - 400) // 160, 64)
    centres = 700 * (np.exp(np.linspace(audio.kaldi_mel(20), audio.kaldi_mel(8000), 66)[1:-1] / 1127) - 1)
    assert abs(centres[fb.mean(0).argmax()] - 1000) < 80


@pytest.mark.parametrize("dtype,scale", [(np.int16, 32768.0), (np.int32, 2.0 ** 31), (np.uint8, None)])
def test_read_wav_matches_scipy(tmp_path, dtype, scale):
    from scipy.io import wavfile

    rng = np.random.default_rng(0)
    if dtype is np.uint8:
        data = rng.integers(0, 256, size=(1000, 2), dtype=np.uint8)
        expect = ((data.astype(np.float64) - 128) / 128).mean(1)
    else:
        info = np.iinfo(dtype)
        data = rng.integers(info.min, info.max, size=(1000, 2), dtype=dtype)
        expect = (data.astype(np.float64) / scale).mean(1)
    wavfile.write(tmp_path / "x.wav", 8000, data)
    x, rate = audio.read_wav(tmp_path / "x.wav")
    assert rate == 8000
    np.testing.assert_allclose(x, expect, atol=1e-6)


def test_write_wav_round_trip_and_bad_file(tmp_path):
    from scipy.io import wavfile

    w = np.sin(np.linspace(0, 40, 3000)) * 0.8
    audio.write_wav(tmp_path / "a.wav", w, 22050)
    rate, data = wavfile.read(tmp_path / "a.wav")
    assert rate == 22050 and data.dtype == np.int16
    np.testing.assert_allclose(data / 32767.0, w, atol=1 / 32767)
    (tmp_path / "b.wav").write_bytes(b"RIFF nonsense")
    with pytest.raises(DataError, match="not a readable PCM WAV"):
        audio.read_wav(tmp_path / "b.wav")


# ----------------------------------------------------------------------------------------------- synthetic


def test_dtmf_tones_have_their_keys_frequencies():
    w, y = synthetic.dtmf(12, keys=np.arange(12), snr_db=(30.0, 30.0), tone_seconds=(0.5, 0.5), seed=3)
    assert w.shape == (12, 20480) and w.dtype == np.float32 and np.abs(w).max() <= 0.9 + 1e-6
    assert list(y) == list(range(12))
    freqs = np.fft.rfftfreq(w.shape[1], 1 / 16000)
    for clip, k in zip(w, y):
        spec = np.abs(np.fft.rfft(clip))
        low = freqs[(freqs < 1100)][spec[freqs < 1100].argmax()]
        high = freqs[(freqs >= 1100)][spec[freqs >= 1100].argmax()]
        lo, hi = synthetic.dtmf_frequencies(synthetic.DTMF_KEYS[k])
        assert abs(low - lo) < 3 and abs(high - hi) < 3  # the two sines of the keypad, nothing else
    again, _ = synthetic.dtmf(12, keys=np.arange(12), snr_db=(30.0, 30.0), tone_seconds=(0.5, 0.5), seed=3)
    assert np.array_equal(w, again)


def test_moving_digits_show_the_digit_moving():
    from sklearn.datasets import load_digits

    clips_, labels = synthetic.moving_digits([0, 5, 9], frames=8, size=32, digit_size=12, clips_per_digit=2, seed=1)
    assert clips_.shape == (6, 8, 32, 32) and clips_.dtype == np.uint8
    assert list(labels) == list(np.repeat(load_digits().target[[0, 5, 9]], 2))
    digit = np.round(synthetic.digit_images(12)[0][5] * 255)
    for clip in clips_[2:4]:  # source digit 5: it must sit, whole, somewhere in every frame
        centres = []
        for f in clip:
            hits = [(y, x) for y in range(21) for x in range(21) if (f[y:y + 12, x:x + 12] >= digit - 1).all()]
            assert hits, "the digit is missing from a frame"
            centres.append(np.mean(hits, axis=0))
        assert np.linalg.norm(centres[-1] - centres[0]) > 1  # it moved
    again, _ = synthetic.moving_digits([0, 5, 9], frames=8, size=32, digit_size=12, clips_per_digit=2, seed=1)
    assert np.array_equal(clips_, again)


# ------------------------------------------------------------------------------------------------- folders


def test_video_folder_through_open_dataset(tmp_path):
    data, labels = synthetic.moving_digits(range(6), frames=4, size=32, digit_size=12, seed=0)
    clips.write_video_folder(tmp_path / "test", data, labels, [str(d) for d in range(10)])
    (tmp_path / "train").mkdir()  # a split folder layout: eval takes test
    tf = clips.VideoTransform(4, 3, (16, 16), [0.5] * 3, [0.5] * 3)
    ds = open_dataset(tmp_path, transform=tf)
    assert len(ds) == 6 and ds.num_classes == 10 and "video clips" in ds.layout
    x, y, ref = ds[0]
    assert x.shape == (4, 3, 16, 16) and ref.endswith(".npy")
    # the resize is torch's own bilinear antialiased resize of the clip, normalised
    raw = torch.from_numpy(np.load(ref)).float()[:, None] / 255
    expect = torch.nn.functional.interpolate(raw, size=(16, 16), mode="bilinear", antialias=True)
    torch.testing.assert_close(x, ((expect - 0.5) / 0.5).expand(-1, 3, -1, -1))
    wrong = clips.VideoTransform(8, 3, (32, 32), [0.5] * 3, [0.5] * 3)
    with pytest.raises(DataError, match="4 frames and the model takes 8.*--frames 4"):
        open_dataset(tmp_path, transform=wrong)[0]


def test_audio_folder_through_open_dataset_resamples(tmp_path):
    w16, y = synthetic.dtmf(3, sample_rate=16000, seconds=0.5, seed=0)
    w8, _ = synthetic.dtmf(3, sample_rate=8000, seconds=0.5, seed=0)
    clips.write_audio_folder(tmp_path / "a", w16, y, synthetic.DTMF_KEYS, 16000)
    clips.write_audio_folder(tmp_path / "b", w8, y, synthetic.DTMF_KEYS, 8000)
    tf = clips.AudioTransform(16000, 32, 48, audio.AUDIOSET_MEAN, audio.AUDIOSET_STD)
    a, b = open_dataset(tmp_path / "a", transform=tf), open_dataset(tmp_path / "b", transform=tf)
    assert "audio clips" in a.layout and a.classes == list(synthetic.DTMF_KEYS)
    xa, ya, _ = a[0]
    xb, yb, _ = b[0]
    assert xa.shape == xb.shape == (48, 32) and ya == yb
    # the 8 kHz file resampled to 16 kHz has the same tone: the same loudest mel band
    assert abs(int(xa.mean(0)[:24].argmax()) - int(xb.mean(0)[:24].argmax())) <= 1
