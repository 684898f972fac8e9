import math

import pytest

from pipeline.masks.diversity import diversity_bits, layer_bits, log2_binomial


def test_small_known_case():
    shape = [4, 4]  # 16 weights at 50%: 4 blocks of 4, one 4x4 transposable block
    assert layer_bits(shape, 2, 4, "nm") == pytest.approx(4 * math.log2(6))
    assert layer_bits(shape, 2, 4, "transposable") == pytest.approx(math.log2(90))
    assert layer_bits(shape, 2, 4, "unstructured") == pytest.approx(math.log2(12870))  # C(16, 8)


def test_ordering_and_additivity():
    shapes = {"a": [8, 16, 3, 3], "b": [16, 32]}
    nm = diversity_bits(shapes, 2, 4, "nm")
    assert diversity_bits(shapes, 2, 4, "transposable") < nm < diversity_bits(shapes, 2, 4, "unstructured")
    assert nm == pytest.approx(layer_bits([8, 16, 3, 3], 2, 4, "nm") + layer_bits([16, 32], 2, 4, "nm"))
    mixed = diversity_bits(shapes, 2, 4, "transposable", {"b": "nm"})
    assert mixed == pytest.approx(layer_bits([8, 16, 3, 3], 2, 4, "transposable") + layer_bits([16, 32], 2, 4, "nm"))


def test_lgamma_binomial_matches_exact_integers():
    assert log2_binomial(1000, 500) == pytest.approx(math.log2(math.comb(1000, 500)))
    with pytest.raises(ValueError):
        log2_binomial(4, 5)
