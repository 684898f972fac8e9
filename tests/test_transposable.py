import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.masks.patterns import is_nm, mask_from_indices
from pipeline.masks.transposable import (
    block_mask_flow,
    count_transposable,
    indices_from_mask,
    masks_enumerate,
    masks_flow,
    masks_greedy,
    transposable_mask,
    transposable_table,
)


def kept(masks, scores):
    return (masks * scores).sum((1, 2))


def test_counts_of_admissible_block_masks():
    assert count_transposable(2, 4) == 90
    assert count_transposable(1, 4) == 24  # permutation matrices
    assert count_transposable(1, 3) == 6
    table = transposable_table(2, 4)
    assert (table.sum(1) == 2).all() and (table.sum(2) == 2).all()
    assert len({tuple(t.flatten().tolist()) for t in table}) == 90


def test_min_cost_flow_agrees_with_enumeration():
    torch.manual_seed(0)
    scores = torch.rand(150, 4, 4)
    assert torch.allclose(kept(masks_flow(scores, 2), scores), kept(masks_enumerate(scores, 2), scores), atol=1e-5)
    scores = torch.rand(40, 4, 4)
    assert torch.allclose(kept(masks_flow(scores, 1), scores), kept(masks_enumerate(scores, 1), scores), atol=1e-5)


def test_flow_on_a_known_block():
    scores = torch.tensor([[9.0, 8.0, 0.0, 0.0], [9.0, 8.0, 0.0, 0.0], [0.0, 0.0, 7.0, 6.0], [0.0, 0.0, 7.0, 6.0]])
    mask = block_mask_flow(scores, 2)
    assert torch.equal(mask, (scores > 0).float())


@pytest.mark.parametrize("power", [1, 8])  # uniform and heavy-tailed magnitudes
def test_exact_never_worse_and_approximation_within_two(power):
    torch.manual_seed(1)
    scores = torch.rand(4000, 4, 4) ** power
    total = scores.sum((1, 2))
    exact, approx = kept(masks_enumerate(scores, 2), scores), kept(masks_greedy(scores, 2), scores)
    raw = kept(masks_greedy(scores, 2, complete=False), scores)
    assert (exact >= approx - 1e-5).all()  # exact prunes no more than the approximation
    assert (raw >= exact / 2 - 1e-6).all()  # the greedy 2-approximation of the kept magnitude
    pruned_exact, pruned_approx = total - exact, total - approx
    assert (pruned_exact <= pruned_approx + 1e-5).all()
    assert (pruned_approx <= 2 * pruned_exact + 1e-5).all()
    assert (approx < exact - 1e-5).any()  # the approximation is not secretly exact


def test_greedy_completes_to_exact_n_per_row_and_column():
    torch.manual_seed(2)
    scores = torch.rand(2000, 4, 4)
    raw = masks_greedy(scores, 2, complete=False)
    assert (raw.sum((1, 2)) < 8).any()  # the plain greedy leaves some blocks short
    done = masks_greedy(scores, 2)
    assert (done.sum(1) == 2).all() and (done.sum(2) == 2).all()


@pytest.mark.parametrize("solver", ["enumerate", "flow", "greedy"])
def test_weight_masks_are_nm_in_both_directions(solver):
    torch.manual_seed(3)
    weight = torch.randn(8, 12, 3, 3)
    mask = transposable_mask(weight, 2, 4, solver)
    assert is_nm(mask, 2, 4) and is_nm(mask.transpose(0, 1), 2, 4)
    assert torch.equal(mask_from_indices(indices_from_mask(mask, 2, 4), 2, 4), mask)
    linear = transposable_mask(torch.randn(8, 16), 2, 4, solver)
    assert is_nm(linear, 2, 4) and is_nm(linear.T, 2, 4)


def test_exact_solvers_agree_on_a_weight():
    torch.manual_seed(4)
    weight = torch.randn(8, 8, 3, 3)
    a, b = transposable_mask(weight, 2, 4, "enumerate"), transposable_mask(weight, 2, 4, "flow")
    assert torch.isclose((a * weight.abs()).sum(), (b * weight.abs()).sum())


def test_untileable_weight_is_refused():
    with pytest.raises(PipelineError, match="out_channels=6"):
        transposable_mask(torch.randn(6, 8, 3, 3), 2, 4)
