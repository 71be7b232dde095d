"""The names of the ComfyUI model folders EraseKit's files live in (`folder_paths` keys under `models/`), shared by
the nodes that list them and the `erasekit fixtures` command that fills them. Plain names: nothing here imports
ComfyUI."""

ERASURES = "erasers"
SPM = "spm"
# "clip" is the folder name both ComfyUI versions know; the newest maps it to models/text_encoders, which also
# lists models/clip.
TEXT_ENCODERS = "clip"
