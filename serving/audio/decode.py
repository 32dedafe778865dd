"""Audio bytes or samples -> mono float32 samples at the model's rate.

Files decode through libsndfile (`soundfile`: WAV, FLAC, OGG/Vorbis, MP3 and the other formats it
reads); containers it cannot read (m4a, mp4, webm) are refused by name. Channels are averaged and the
rate converted with a polyphase filter (`scipy.signal.resample_poly`).
"""

from __future__ import annotations

import io
import math

import numpy as np

MAX_AUDIO_SECONDS = 4 * 3600.0  # a bound on one upload's duration
MAX_SAMPLING_RATE = 384_000


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """`samples [N]` at `rate` Hz -> float32 samples at `target` Hz."""
    if not 1 <= rate <= MAX_SAMPLING_RATE:
        raise ValueError(f"the audio's sampling rate must be in [1, {MAX_SAMPLING_RATE}] Hz, got {rate}")
    samples = np.asarray(samples, np.float32)
    if rate == target:
        return samples
    from scipy.signal import resample_poly

    common = math.gcd(rate, target)
    return resample_poly(samples, target // common, rate // common).astype(np.float32)


def mono(samples: np.ndarray) -> np.ndarray:
    """`[N]` or `[N, channels]` samples -> `[N]` (channels averaged)."""
    samples = np.asarray(samples, np.float32)
    if samples.ndim == 2:
        return samples.mean(axis=1)
    if samples.ndim != 1:
        raise ValueError(f"audio samples must be [N] or [N, channels], got shape {samples.shape}")
    return samples


def decode_audio(data: bytes, target_rate: int, max_seconds: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """An audio file's bytes -> mono float32 samples at `target_rate`; ValueError naming what is wrong."""
    import soundfile

    if not data:
        raise ValueError("the audio file is empty")
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            if f.frames > max_seconds * f.samplerate:
                raise ValueError(f"the audio is {f.frames / f.samplerate:.0f} s long; at most {max_seconds:.0f} s")
            samples, rate = f.read(dtype="float32", always_2d=True), f.samplerate
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        reason = str(e).rsplit(": ", 1)[-1].rstrip(".")  # libsndfile's reason, without the stream's repr
        raise ValueError(f"could not decode the audio file ({reason}); send WAV, FLAC, OGG or MP3") from None
    if not np.isfinite(samples).all():
        raise ValueError("the audio holds non-finite samples")
    return resample(mono(samples), rate, target_rate)
