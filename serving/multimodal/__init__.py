"""Images in serving: decoding and preprocessing, placeholder expansion, the encoder step.

`images` turns what a caller sends (PIL images, arrays, bytes) into pixel arrays through the
checkpoint's own image processor; `inputs` expands image placeholders in a prompt and keeps
one `ImageItem` per image; `encoder` runs the vision tower under the scheduler's encoder
budget and hands the step its features as `MergedEmbeddings`; `media` fetches image URLs for
the OpenAI server.
"""
