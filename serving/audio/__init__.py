"""Audio input: decoding uploads (`decode.py`) and Whisper's transcription requests (`whisper.py`)."""
