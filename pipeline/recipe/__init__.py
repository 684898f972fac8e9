"""Recipes: the typed config, registered recipe files, source specs, building the network and loading its weights."""
