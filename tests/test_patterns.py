import pytest
import torch

from pipeline.masks.patterns import (
    from_blocks,
    is_nm,
    magnitude_indices,
    mask_from_indices,
    nm_violations,
    num_patterns,
    pattern_table,
    to_blocks,
)


def test_pattern_table_is_every_two_of_four():
    table = pattern_table(2, 4)
    assert table.shape == (6, 4)
    assert (table.sum(1) == 2).all()
    assert len({tuple(row.tolist()) for row in table}) == 6
    assert pattern_table(1, 4).shape == (4, 4) and num_patterns(4, 8) == 70


def test_blocks_run_along_input_channels_at_each_kernel_position():
    weight = torch.arange(2 * 8 * 3 * 3).reshape(2, 8, 3, 3)
    blocks = to_blocks(weight, 4)
    assert blocks.shape == (2, 3, 3, 2, 4)
    # block (k=1, r=2, s=0, group 1) holds channels 4..7 at that position
    assert blocks[1, 2, 0, 1].tolist() == [weight[1, c, 2, 0].item() for c in range(4, 8)]
    assert torch.equal(from_blocks(blocks), weight)


def test_linear_blocks_run_along_in_features():
    weight = torch.arange(3 * 8).reshape(3, 8)
    assert to_blocks(weight, 4)[2, 1].tolist() == weight[2, 4:8].tolist()


def test_flattened_order_masks_are_not_tensorrt_layout():
    # a mask that is 2:4 in flattened C*R*S order (the paper's code) is not 2:4 along C
    weight = torch.ones(1, 4, 2, 2)
    flat = torch.tensor([1.0, 1, 0, 0] * 4).reshape(1, 4, 2, 2)
    assert not is_nm(weight * flat, 2, 4)
    assert nm_violations(weight * flat, 2, 4) > 0


def test_magnitude_mask_keeps_two_largest_per_block():
    weight = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.5, -0.2, 0.0]])
    mask = mask_from_indices(magnitude_indices(weight, 2, 4), 2, 4)
    assert mask.tolist() == [[0, 1, 1, 0, 1, 1, 0, 0]]
    assert is_nm(weight * mask, 2, 4)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (4, 8)])
def test_general_n_m_masks(n, m):
    weight = torch.randn(4, 2 * m, 3, 3)
    masked = weight * mask_from_indices(magnitude_indices(weight, n, m), n, m)
    assert is_nm(masked, n, m)
    assert int((to_blocks(masked, m) != 0).sum(-1).max()) == n
