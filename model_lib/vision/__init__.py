"""Vision towers, multimodal projectors and the vision-language model wrappers."""
