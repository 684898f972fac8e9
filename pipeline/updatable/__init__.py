"""The updatable-model demo (paper, sec. 3.2; `python -m pipeline updatable`)."""
