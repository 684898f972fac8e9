"""The compare step: every mask method against the dense model (`python -m pipeline compare`)."""
