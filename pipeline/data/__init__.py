"""Datasets and loaders: Fashion-MNIST, ImageFolder and synthetic data, with the recipe's preprocessing."""
