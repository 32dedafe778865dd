"""Whisper served: `LLM.transcribe` and `/v1/audio/transcriptions` on a tiny random Whisper (1 s windows)
with audio synthesized at test time; every window's tokens equal transformers' `generate` (its
suppressed tokens, language detection and text prompt included)."""

from __future__ import annotations

import io

import numpy as np
import openai
import pytest
import soundfile
import torch

from serving.audio.whisper import join_texts
from tests.serving.test_pooling_server import serve_in_thread
from tests.whisper_models import build_whisper_checkpoint

pytestmark = pytest.mark.xdist_group("whisper")  # one worker: the server test serves the offline tests' LLM
RATE = 16000


def synthesized(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """Tones gliding over noise: features that differ from window to window."""
    rng = np.random.RandomState(seed)
    t = np.arange(int(seconds * rate)) / rate
    glide = np.sin(2 * np.pi * (220 + 180 * t) * t) * (0.5 + 0.4 * np.sin(2 * np.pi * 0.7 * t))
    return (0.6 * glide + 0.05 * rng.randn(t.size)).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    """(folder, transformers model, LLM) of a tiny random Whisper."""
    from serving.llm import LLM

    folder = tmp_path_factory.mktemp("whisper")
    reference = build_whisper_checkpoint(folder)
    return folder, reference, LLM(folder, max_num_seqs=4, num_pages=32)


def reference_tokens(reference, features: np.ndarray, prompt: list[int], max_new_tokens: int, **options) -> list[int]:
    """transformers' greedy `generate` on one window: the tokens after the decoder prompt `prompt`."""
    with torch.no_grad():
        sequence = reference.generate(input_features=torch.as_tensor(features[None]), max_new_tokens=max_new_tokens,
                                      do_sample=False, num_beams=1, **options)[0].tolist()
    return sequence[len(prompt):] if sequence[:len(prompt)] == prompt else sequence


def check_windows(llm, reference, outputs, features, **options) -> None:
    """Each window's tokens (EOS included) are transformers' for the same features and options."""
    assert len(outputs) == len(features)
    for output, window in zip(outputs, features):
        prompt = output.prompt_token_ids
        room = llm.engine.max_model_len - len(prompt)
        assert output.outputs[0].token_ids == reference_tokens(reference, window, prompt, room, **options)


def test_transcribe_matches_transformers_generate(whisper):
    folder, reference, llm = whisper
    transcriber = llm.transcriber
    audio = synthesized(2.4)
    features = transcriber.features(transcriber.samples(audio, RATE))
    assert len(features) == 3  # 1 s windows, the last one padded
    tokens = transcriber.tokens
    english = tokens.language_id("english")
    assert tokens.language_id("en") == tokens.language_id("<|en|>") == english
    outputs = llm.transcribe(audio, sampling_rate=RATE, language="en")
    assert [o.prompt_token_ids for o in outputs] == [[tokens.start, english, tokens.tasks["transcribe"],
                                                      tokens.no_timestamps]] * 3
    check_windows(llm, reference, outputs, features, language="en", task="transcribe")
    # vLLM's offline form: a decoder prompt and one window of audio through `generate`.
    from serving.sampling_params import SamplingParams

    one = llm.generate({"prompt": "<|startoftranscript|><|en|><|transcribe|><|notimestamps|>",
                        "multi_modal_data": {"audio": (audio[:RATE], RATE)}}, SamplingParams(temperature=0, max_tokens=60))
    assert one[0].prompt_token_ids == outputs[0].prompt_token_ids
    assert one[0].outputs[0].token_ids == outputs[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="longer than one 1 s window"):
        llm.generate({"prompt": "<|startoftranscript|>", "multi_modal_data": {"audio": (audio, RATE)}})
    # The same audio as a WAV file at another rate decodes and resamples to (nearly) the same features.
    from_file = transcriber.features(transcriber.samples(wav_bytes(synthesized(2.4, 22050), 22050)))
    assert len(from_file) == 3


def test_language_detection_and_text_prompt_match_transformers(whisper):
    folder, reference, llm = whisper
    transcriber, tokenizer = llm.transcriber, llm.tokenizer
    audio = synthesized(1.5, seed=1)
    features = transcriber.features(transcriber.samples(audio, RATE))
    # No language: each window's is detected first (the likeliest language token), as transformers does.
    detected = llm.transcribe(audio, sampling_rate=RATE)
    assert all(o.prompt_token_ids[1] in transcriber.tokens.languages.values() for o in detected)
    check_windows(llm, reference, detected, features, task="transcribe")
    # A text prompt goes first, after <|startofprev|>.
    prompted = llm.transcribe(wav_bytes(audio, RATE), language="de", prompt="  b a  ")
    prompt_ids = [transcriber.tokens.previous, *tokenizer.encode(" b a", add_special_tokens=False)]
    assert all(o.prompt_token_ids[:len(prompt_ids)] == prompt_ids for o in prompted)
    features = transcriber.features(transcriber.samples(wav_bytes(audio, RATE)))
    check_windows(llm, reference, prompted, features, language="de", task="transcribe",
                  prompt_ids=torch.as_tensor(prompt_ids))
    suppressed = set(transcriber.tokens.suppress)
    assert not any(suppressed & set(o.outputs[0].token_ids) for o in [*detected, *prompted])
    with pytest.raises(ValueError, match="language 'xx' is not one this model knows"):
        llm.transcribe(audio, sampling_rate=RATE, language="xx")
    with pytest.raises(ValueError, match="could not decode the audio file"):
        llm.transcribe(b"RIFF not really a wave file")
    with pytest.raises(ValueError, match="transcribes audio"):
        llm.generate("a text prompt")


def test_openai_client_transcriptions_equal_transformers(whisper):
    folder, reference, llm = whisper
    transcriber, tokenizer = llm.transcriber, llm.tokenizer
    audio = synthesized(2.2, seed=2)
    features = transcriber.features(transcriber.samples(audio, RATE))
    prompt = transcriber.tokens.decoder_prompt(transcriber.tokens.language_id("en"), "transcribe", [], 0)
    room = llm.engine.max_model_len - len(prompt)
    texts = [tokenizer.decode(reference_tokens(reference, f, prompt, room, language="en", task="transcribe"),
                              skip_special_tokens=True) for f in features]
    upload = wav_bytes(audio, RATE)
    translations = llm.transcribe(upload, task="translate")  # offline first: the server takes the engine over
    assert all(o.prompt_token_ids[2] == transcriber.tokens.tasks["translate"] for o in translations)
    check_windows(llm, reference, translations, transcriber.features(transcriber.samples(upload)), task="translate")
    with serve_in_thread(folder, llm=llm) as server:
        client = openai.OpenAI(base_url=server["base"] + "/v1", api_key="none", max_retries=0)
        result = client.audio.transcriptions.create(model="tiny", file=("speech.wav", upload, "audio/wav"),
                                                    language="en")
        assert result.text == join_texts(texts)
        plain = client.audio.transcriptions.create(model="tiny", file=("speech.wav", upload, "audio/wav"),
                                                   language="en", response_format="text")
        assert plain == result.text
        for options, match in [(dict(file=("x.wav", b"not audio at all", "audio/wav")), "could not decode"),
                               (dict(response_format="srt"), "no timestamps"),
                               (dict(language="xx"), "language 'xx'"),
                               (dict(temperature=1.5), "temperature")]:
            with pytest.raises(openai.BadRequestError, match=match):
                client.audio.transcriptions.create(**{"model": "tiny", "file": ("speech.wav", upload, "audio/wav"),
                                                      **options})
        with pytest.raises(openai.NotFoundError):
            client.audio.transcriptions.create(model="other", file=("speech.wav", upload, "audio/wav"))
        # Streamed: OpenAI's transcript events, whose deltas add up to the same text.
        events = list(client.audio.transcriptions.create(model="tiny", file=("speech.wav", upload, "audio/wav"),
                                                         language="en", stream=True))
        deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
        assert len(deltas) > len(features) and "".join(deltas) == result.text
        assert events[-1].type == "transcript.text.done" and events[-1].text == result.text
        # Translation: the language is detected, then Whisper's translate task runs.
        translated = client.audio.translations.create(model="tiny", file=("speech.wav", upload, "audio/wav"))
        assert translated.text == join_texts([o.outputs[0].text for o in translations])
        # The server goes on serving.
        assert client.audio.transcriptions.create(model="tiny", file=("s.wav", upload, "audio/wav"),
                                                  language="en").text == result.text


def test_english_only_prompts_and_refusals(tmp_path):
    """An English-only checkpoint (`is_multilingual` false, as whisper-*.en): no language or task tokens; a
    translation or another language is refused by name, as transformers refuses them."""
    import json

    from transformers import WhisperFeatureExtractor

    from serving.audio.whisper import Transcriber, WhisperTokens

    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"decoder_start_token_id": 50257, "no_timestamps_token_id": 50362, "prev_sot_token_id": 50360,
         "is_multilingual": False, "suppress_tokens": [1, 2], "begin_suppress_tokens": [220, 50256]}))
    tokens = WhisperTokens.load(tmp_path)
    assert tokens.decoder_prompt(None, "transcribe", [], 10) == [50257, 50362]
    assert tokens.decoder_prompt(None, "transcribe", [7, 8, 9], 2) == [50360, 8, 9, 50257, 50362]
    with pytest.raises(ValueError, match="English-only model: it transcribes, it does not translate"):
        tokens.decoder_prompt(None, "translate", [], 10)
    transcriber = Transcriber(WhisperFeatureExtractor(feature_size=8), tokens, None, 50363, 448)
    assert not transcriber.needs_detection(None) and transcriber.language_ids("English", 2) == [None, None]
    with pytest.raises(ValueError, match="English-only model; language 'de' is not English"):
        transcriber.language_ids("de", 1)
    (tmp_path / "generation_config.json").write_text(json.dumps({"decoder_start_token_id": 1, "is_multilingual": True}))
    with pytest.raises(ValueError, match="needs lang_to_id and task_to_id"):
        WhisperTokens.load(tmp_path)
