"""What EraseKit's trainers share: objective pieces (objectives.py), resumable runs (resumable.py) and a model
frozen for the duration of a computation (frozen.py)."""
