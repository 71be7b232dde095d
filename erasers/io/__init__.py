"""Files in and out: single-file checkpoints (checkpoints.py), diffusers component folders and safetensors metadata
(components.py), whole models to read erasures from and merge them into (model_files.py), text encoders and their
tokenizers (text_encoders.py), prompt lists (prompt_lists.py) and ComfyUI's model
folder names (comfy_folders.py)."""
