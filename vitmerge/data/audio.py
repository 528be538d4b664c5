"""Audio in, AST features out: WAV files and the log-mel filterbank the Audio Spectrogram Transformer takes.

:func:`log_mel` is Kaldi's ``fbank`` as transformers' ``ASTFeatureExtractor`` computes it without
torchaudio (its numpy path): 25 ms frames every 10 ms (400 / 160 samples at 16 kHz, whatever the rate),
DC offset removed per frame, pre-emphasis 0.97, a symmetric Hann window, a 512-point power spectrum,
triangular filters on Kaldi's mel scale (``1127 ln(1 + f / 700)``, triangles in mel space, 20 Hz to
Nyquist), natural log with a floor of float32's epsilon. Here it is vectorised over frames; the tests
compare it with transformers' own extractor. :func:`ast_features` then pads / cuts to the model's
``max_length`` frames and normalises as AST does: ``(fbank - mean) / (2 * std)`` (AudioSet's mean and
std unless the model folder's ``preprocessor_config.json`` says otherwise).

WAV files are read with the standard library (PCM 8/16/24/32-bit; several channels are averaged);
nothing here needs torchaudio.
"""
from __future__ import annotations

import wave
from pathlib import Path
from typing import Tuple, Union

import numpy as np

from ..errors import DataError

SAMPLE_RATE = 16000
FRAME_LENGTH = 400
HOP_LENGTH = 160
FFT_LENGTH = 512
PREEMPHASIS = 0.97
MEL_FLOOR = 1.192092955078125e-07  # float32 epsilon, as Kaldi
MIN_FREQUENCY = 20.0
AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974


def kaldi_mel(hz):
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_filters(num_mel_bins: int, sample_rate: int = SAMPLE_RATE, fft_length: int = FFT_LENGTH,
                min_frequency: float = MIN_FREQUENCY) -> np.ndarray:
    """[fft_length // 2 + 1, num_mel_bins] triangular filters, Kaldi style (triangles in mel space)."""
    bins = fft_length // 2 + 1
    mels = np.linspace(kaldi_mel(min_frequency), kaldi_mel(sample_rate // 2), num_mel_bins + 2)
    fft_mels = kaldi_mel(sample_rate / fft_length * np.arange(bins))
    rising = (fft_mels[:, None] - mels[None, :-2]) / (mels[1:-1] - mels[:-2])
    falling = (mels[None, 2:] - fft_mels[:, None]) / (mels[2:] - mels[1:-1])
    return np.maximum(0.0, np.minimum(rising, falling))


def log_mel(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = 128) -> np.ndarray:
    """[frames, num_mel_bins] float32 log-mel filterbank of a mono waveform (floats, about [-1, 1])."""
    x = np.asarray(waveform, dtype=np.float64).reshape(-1)
    if x.size < FRAME_LENGTH:
        x = np.pad(x, (0, FRAME_LENGTH - x.size))
    frames = np.lib.stride_tricks.sliding_window_view(x, FRAME_LENGTH)[::HOP_LENGTH].copy()  # [F, 400]
    frames -= frames.mean(axis=1, keepdims=True)
    frames[:, 1:] -= PREEMPHASIS * frames[:, :-1].copy()
    frames[:, 0] *= 1.0 - PREEMPHASIS
    frames *= np.hanning(FRAME_LENGTH)  # symmetric Hann (numpy's hanning), as the extractor's window
    spec = np.fft.rfft(frames, n=FFT_LENGTH).astype(np.complex64)  # the extractor keeps complex64
    power = np.abs(spec, dtype=np.float64) ** 2
    mel = np.maximum(MEL_FLOOR, power @ mel_filters(num_mel_bins, sample_rate))
    return np.log(mel).astype(np.float32)


def ast_features(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = 128,
                 max_length: int = 1024, mean: float = AUDIOSET_MEAN, std: float = AUDIOSET_STD) -> np.ndarray:
    """[max_length, num_mel_bins] float32: what an AST takes as ``input_values`` for one clip."""
    fb = log_mel(waveform, sample_rate, num_mel_bins)
    if fb.shape[0] < max_length:
        fb = np.pad(fb, ((0, max_length - fb.shape[0]), (0, 0)))
    fb = fb[:max_length]
    return ((fb - mean) / (std * 2)).astype(np.float32)


def read_wav(path: Union[str, Path]) -> Tuple[np.ndarray, int]:
    """(mono float32 waveform in [-1, 1], sample rate) of a PCM WAV file."""
    try:
        with wave.open(str(path), "rb") as w:
            n, ch, width, rate = w.getnframes(), w.getnchannels(), w.getsampwidth(), w.getframerate()
            raw = w.readframes(n)
    except (OSError, EOFError, wave.Error) as e:
        raise DataError(f"{str(path)!r} is not a readable PCM WAV file ({e})") from None
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    else:  # pragma: no cover - wave only writes these widths
        raise DataError(f"{str(path)!r}: {8 * width}-bit samples are not supported (PCM 8/16/24/32-bit)")
    if ch > 1:
        x = x.reshape(-1, ch).mean(axis=1)
    return x, int(rate)


def to_pcm16(waveform: np.ndarray) -> np.ndarray:
    """int16 samples of a float waveform (clipped to [-1, 1])."""
    return np.clip(np.round(np.asarray(waveform, np.float64) * 32767.0), -32768, 32767).astype("<i2")


def write_wav(path: Union[str, Path], waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write a mono float waveform as 16-bit PCM."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(to_pcm16(waveform).tobytes())


__all__ = ["log_mel", "ast_features", "mel_filters", "kaldi_mel", "read_wav", "write_wav", "to_pcm16", "SAMPLE_RATE",
           "AUDIOSET_MEAN", "AUDIOSET_STD"]
