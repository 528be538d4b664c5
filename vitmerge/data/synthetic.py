"""Labelled video and audio made in code (no downloads): the offline data of the video and audio demo models.

* :func:`moving_digits`: clips of scikit-learn's handwritten digits moving across a noisy frame in a
  straight line (random start, direction and speed); the class is the digit. Most of each clip is
  background, and a digit looks the same in every frame: the redundancy token merging feeds on, in
  space and in time.
* :func:`dtmf`: telephone keypad tones (DTMF: one low and one high sine per key) of random onset,
  length and level in white noise; the class is the key. The tone fills a small part of the
  spectrogram, the rest is noise, as in much of AudioSet.

Both are deterministic: the same arguments give the same arrays on every machine (NumPy's
``RandomState``). Which source digits go to training and which to testing is decided by the caller
(``digits``: indices into scikit-learn's 1,797 digits), so train and test clips never share a digit
image.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError

#: DTMF keys in sorted-name order (the class index of each key); rows x columns of the keypad
DTMF_KEYS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "hash", "star")
DTMF_LOW = (697.0, 770.0, 852.0, 941.0)
DTMF_HIGH = (1209.0, 1336.0, 1477.0)
_PAD = {"1": (0, 0), "2": (0, 1), "3": (0, 2), "4": (1, 0), "5": (1, 1), "6": (1, 2), "7": (2, 0), "8": (2, 1),
        "9": (2, 2), "star": (3, 0), "0": (3, 1), "hash": (3, 2)}


def dtmf_frequencies(key: str) -> Tuple[float, float]:
    row, col = _PAD[key]
    return DTMF_LOW[row], DTMF_HIGH[col]


def digit_images(size: int) -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as float32 [N, size, size] in [0, 1] (bilinear upsampling) and labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - dependency
        raise DataError("the moving-digits videos need scikit-learn (pip install scikit-learn)") from None
    import torch
    import torch.nn.functional as F

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return x.clamp(0, 1).numpy(), np.asarray(d.target, dtype=np.int64)


def moving_digits(digits: Sequence[int], frames: int = 16, size: int = 32, digit_size: int = 14,
                  clips_per_digit: int = 1, noise: float = 0.15, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Clips uint8 [n, frames, size, size] (grey, ink bright) and labels [n] (the digit).

    Each clip shows one digit (``digits`` are indices into scikit-learn's set) moving in a straight line
    from a random point at a random speed (up to about half the free space per clip), over a background
    of uniform noise of level ``noise``. ``clips_per_digit`` clips per source digit, in order.
    """
    if frames < 1 or size < digit_size or digit_size < 4:
        raise DataError(f"moving digits need frames >= 1 and 4 <= digit_size <= size, got {frames}, {digit_size}, {size}")
    imgs, labels = digit_images(digit_size)
    rng = np.random.RandomState(seed)
    idx = np.repeat(np.asarray(digits, dtype=np.int64), clips_per_digit)
    out = np.empty((len(idx), frames, size, size), dtype=np.uint8)
    free = size - digit_size
    t = np.arange(frames, dtype=np.float64)[:, None]
    for n, i in enumerate(idx):
        start = rng.uniform(0, free, size=2)
        angle = rng.uniform(0, 2 * np.pi)
        speed = rng.uniform(0.25, 0.5) * free / max(frames - 1, 1)
        path = start + t * speed * np.array([np.sin(angle), np.cos(angle)])
        path = np.abs(np.mod(path, 2 * free) - free)  # bounce off the borders (a triangle wave)
        clip = rng.uniform(0, noise, size=(frames, size, size))
        for f, (y, x) in enumerate(np.round(path).astype(int)):
            patch = clip[f, y:y + digit_size, x:x + digit_size]
            np.maximum(patch, imgs[i], out=patch)
        out[n] = np.round(clip * 255).astype(np.uint8)
    return out, labels[idx]


def dtmf(n: int, sample_rate: int = 16000, seconds: float = 1.28, snr_db: Tuple[float, float] = (-12.0, 0.0),
         tone_seconds: Tuple[float, float] = (0.08, 0.3), seed: int = 0,
         keys: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Waveforms float32 [n, samples] in [-1, 1] and labels [n] (index into :data:`DTMF_KEYS`).

    Each clip: white noise, and one key's two sines (equal level, 5 ms fades) of random length in
    ``tone_seconds`` starting at a random time, at a random signal-to-noise ratio in ``snr_db`` (power
    of the tone while it sounds over the noise's); the whole clip is scaled to peak at 0.9.
    """
    rng = np.random.RandomState(seed)
    samples = int(round(seconds * sample_rate))
    labels = rng.randint(0, len(DTMF_KEYS), size=n) if keys is None else np.asarray(keys, dtype=np.int64)
    if len(labels) != n:
        raise DataError(f"dtmf: {len(labels)} keys given for {n} clips")
    out = np.empty((n, samples), dtype=np.float32)
    fade = int(0.005 * sample_rate)
    for i, k in enumerate(labels):
        lo, hi = dtmf_frequencies(DTMF_KEYS[int(k)])
        length = int(rng.uniform(*tone_seconds) * sample_rate)
        start = rng.randint(0, max(samples - length, 1))
        t = np.arange(length) / sample_rate
        phase = rng.uniform(0, 2 * np.pi, size=2)
        tone = np.sin(2 * np.pi * lo * t + phase[0]) + np.sin(2 * np.pi * hi * t + phase[1])
        env = np.ones(length)
        ramp = np.linspace(0, 1, min(fade, length // 2))
        env[:len(ramp)] = ramp
        env[length - len(ramp):] = ramp[::-1]
        noise = rng.standard_normal(samples)
        snr = 10 ** (rng.uniform(*snr_db) / 10)
        x = noise
        x[start:start + length] += np.sqrt(snr) * tone * env  # tone power 1 (two unit sines), noise power 1
        out[i] = (0.9 * x / np.abs(x).max()).astype(np.float32)
    return out, labels.astype(np.int64)


__all__ = ["moving_digits", "dtmf", "digit_images", "dtmf_frequencies", "DTMF_KEYS", "DTMF_LOW", "DTMF_HIGH"]
