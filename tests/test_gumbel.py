import pytest
import torch
import torch.nn.functional as F

from pipeline.masks.eligibility import find_layers
from pipeline.masks.gumbel import (
    GumbelMask,
    _MaskedWeight,
    attach_masks,
    current_indices,
    mask_training_mode,
    masked_modules,
    straight_through_reference,
)
from pipeline.masks.patterns import is_nm, magnitude_indices, pattern_table, to_blocks
from pipeline.recipe.nets import SmallResNet


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = SmallResNet(10, 1, (8, 16, 32), stem_stride=2)
    for module in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def masked_tiny(init="magnitude"):
    model = tiny_model()
    report = find_layers(model, [1, 28, 28])
    attach_masks(model, report, 2, 4, prior=init, strength=20.0, seed=0)
    return model, report


@pytest.mark.parametrize("shape", [(8, 12, 3, 3), (6, 16)])
def test_fast_straight_through_matches_textbook_gradient(shape):
    """The pattern-major Function equals the block-last textbook formulation, value and gradient."""
    from pipeline.masks.gumbel import pattern_codes, to_position_major

    torch.manual_seed(0)
    weight = torch.randn(*shape, dtype=torch.float64)
    blocks = to_blocks(weight, 4).shape[:-1]
    logits_last = torch.randn(*blocks, 6, dtype=torch.float64, requires_grad=True)
    gumbel_last = -torch.empty_like(logits_last).exponential_().log()
    table = pattern_table(2, 4, torch.float64)
    upstream = torch.randn(*shape, dtype=torch.float64)

    reference = straight_through_reference(logits_last, gumbel_last, 0.7, table, weight)
    (grad_ref,) = torch.autograd.grad((reference * upstream).sum(), logits_last)

    logits = logits_last.detach().movedim(-1, 0).contiguous().requires_grad_(True)
    gumbel = gumbel_last.movedim(-1, 0).contiguous()
    fast = _MaskedWeight.apply(
        logits, gumbel / 0.7, 0.7, to_position_major(weight, 4).contiguous(), table, pattern_codes(2, 4)
    )
    (grad_fast,) = torch.autograd.grad((fast * upstream).sum(), logits)
    assert torch.allclose(fast, reference.detach(), atol=1e-12)
    assert torch.allclose(grad_fast, grad_ref.movedim(-1, 0), atol=1e-12)
    assert is_nm(fast.detach(), 2, 4)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (1, 2), (3, 6)])
def test_first_argmax_keep_is_the_keep_row_of_torch_argmax(n, m):
    """The table path (P <= 9) and the fallback give the keep row of torch.argmax's pattern, ties included."""
    from pipeline.masks.gumbel import first_argmax_keep, pattern_codes

    count = pattern_table(n, m).shape[0]
    generator = torch.Generator().manual_seed(n * 10 + m)
    scores = torch.randint(-2, 3, (count, 4000), generator=generator).float()  # many ties
    scores[:, :2000] += torch.randn(count, 2000, generator=generator)
    expected = pattern_table(n, m)[scores.argmax(0)].to(torch.uint8)
    assert torch.equal(first_argmax_keep(scores, pattern_codes(n, m), m), expected)


def test_in_place_softmax_and_its_backward_are_bit_exact_on_cpu():
    """The masked weight's CPU backward runs softmax and its backward in place; they equal the out-of-place ops."""
    generator = torch.Generator().manual_seed(3)
    for count in (6, 28):
        z, g = torch.randn(count, 5000, generator=generator) * 5, torch.randn(count, 5000, generator=generator)
        soft = torch.softmax(z, 0)
        expected = torch.ops.aten._softmax_backward_data(g, soft, 0, torch.float32)
        in_place = z.clone()
        assert torch.equal(torch.ops.aten._softmax.out(in_place, 0, False, out=in_place), soft)
        grad = g.clone()
        assert torch.equal(
            torch.ops.aten._softmax_backward_data.out(grad, soft, 0, torch.float32, grad_input=grad), expected
        )


def test_first_argmax_codes_follow_torch_argmax_ties():
    from pipeline.masks.gumbel import first_argmax_codes, pattern_codes

    scores = torch.tensor([[0.0, 1.0, 2.0], [3.0, 1.0, 2.0], [3.0, 0.5, 2.0]]).T.contiguous().T  # [P=3, Nb=3]
    scores = torch.cat([scores, torch.full((3, 3), -9.0)])  # six patterns
    codes = pattern_codes(2, 4)
    expected = [codes[int(i)] for i in scores.argmax(0)]
    assert first_argmax_codes(scores, codes, 4).tolist() == expected


def test_gradients_reach_only_the_logits():
    model, _ = masked_tiny()
    mask_training_mode(model)
    loss = F.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith("sparse_mask.logits") for name in trainable)
    assert all(p.grad is None for name, p in model.named_parameters() if not name.endswith("logits"))
    assert all(module.sparse_mask.logits.grad.abs().sum() > 0 for module in masked_modules(model).values())


def test_pattern_table_is_a_buffer_not_a_parameter():
    model, _ = masked_tiny()
    assert not any("table" in name for name, _ in model.named_parameters())
    assert all(not m.table.requires_grad for m in model.modules() if isinstance(m, GumbelMask))


def test_training_keeps_weights_biases_and_batchnorm_bit_identical():
    model, _ = masked_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items() if "sparse_mask" not in k}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        mask_training_mode(model)
        loss = F.cross_entropy(model(torch.randn(8, 1, 28, 28)), torch.randint(0, 10, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = {k: v for k, v in model.state_dict().items() if "sparse_mask" not in k}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(m.training is False for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_argmax_masks_are_deterministic_in_eval():
    model, _ = masked_tiny(init="uniform")
    model.eval()
    x = torch.randn(3, 1, 28, 28)
    first, second = model(x), model(x)
    assert torch.equal(first, second)
    module = next(iter(masked_modules(model).values()))
    assert torch.equal(module.sparse_mask(), module.sparse_mask())
    mask_training_mode(model)
    sampled = [module.sparse_mask() for _ in range(5)]
    assert any(not torch.equal(sampled[0], s) for s in sampled[1:])  # training does sample noise


def test_magnitude_init_starts_from_the_magnitude_mask():
    model, _ = masked_tiny(init="magnitude")
    reference = tiny_model()
    for name, indices in current_indices(model).items():
        assert torch.equal(indices, magnitude_indices(reference.get_submodule(name).weight, 2, 4))


def test_masked_forward_equals_dense_model_with_masked_weights():
    model, _ = masked_tiny()
    model.eval()
    dense = tiny_model()
    with torch.no_grad():
        for name, module in masked_modules(model).items():
            mask = module.sparse_mask()
            dense.get_submodule(name).weight.mul_(mask)
            assert is_nm(dense.get_submodule(name).weight, 2, 4)
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(model(x), dense(x), atol=1e-6)


def test_skipped_layers_have_reasons_and_coverage_is_reported():
    model = tiny_model()
    report = find_layers(model, [1, 28, 28])
    skipped = {layer.name: layer.reason for layer in report.skipped}
    assert "multiple of 4" in skipped["conv1"] and "classifier" in skipped["fc"]
    assert 0.9 < report.masked_mac_fraction < 1.0
    included = find_layers(model, [1, 28, 28], include_classifier=True, exclude=["layer3.*"])
    names = {layer.name for layer in included.masked}
    assert "fc" in names and not any(name.startswith("layer3") for name in names)


def test_convnext_mlp_linear_layers_are_masked_and_depthwise_skipped():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.convnext_tiny(weights=None)
    report = find_layers(model, [3, 64, 64], classifier="classifier.2")
    masked = {layer.name for layer in report.masked}
    assert "features.1.0.block.3" in masked and "features.1.0.block.5" in masked
    assert any("depthwise" in layer.reason for layer in report.skipped)
    assert report.masked_mac_fraction > 0.9


def test_eval_mask_follows_every_optimizer_update():
    """Regression: the fused AdamW kernel does not bump the logits' version counter."""
    from pipeline.masks.mask_step import mask_optimizer

    model, _ = masked_tiny(init="uniform")
    module = next(iter(masked_modules(model).values()))
    model.eval()
    before = module.sparse_mask().clone()
    optimizer = mask_optimizer([module.sparse_mask.logits], lr=1.0, weight_decay=0.0)
    module.sparse_mask.logits.grad = torch.randn_like(module.sparse_mask.logits)
    optimizer.step()
    assert not torch.equal(module.sparse_mask(), before)


def test_kept_magnitude_regulariser_is_the_straight_through_gradient_of_the_kept_share():
    """The fused regulariser equals autograd through the textbook estimator of
    loss = -c * sum(mask * |W|) / sum(|W|), and its ascent alone pulls a uniform start to the magnitude mask."""

    torch.manual_seed(0)
    weight = torch.randn(8, 12, 3, 3)
    logits = torch.randn(6, 8, 3, 3, 3)
    gumbel = torch.randn_like(logits)
    mask = GumbelMask(logits.clone(), 2, 4)
    mask.kept_coefficient, mask.tau = 3.0, 0.7
    mask.train()
    mask.noise = type("FixedNoise", (), {"draw": lambda self, numel, device, tau: gumbel.reshape(-1) / tau})()
    mask.masked_weight(weight).sum().mul(0.0).backward()  # no task loss: the gradient is the regulariser's
    fused = mask.logits.grad.clone()

    reference_logits = logits.movedim(0, -1).clone().requires_grad_()  # block-last for the reference
    masked = straight_through_reference(reference_logits, gumbel.movedim(0, -1), 0.7, mask.table, weight.abs())
    (-3.0 * masked.sum() / weight.abs().sum()).backward()
    assert torch.allclose(fused, reference_logits.grad.movedim(-1, 0), atol=1e-6)

    ascent = GumbelMask(torch.zeros(6, 8, 3, 3, 3), 2, 4)
    ascent.kept_coefficient = 1.0
    ascent.train()
    optimizer = torch.optim.SGD([ascent.logits], lr=5000.0)
    for _ in range(60):
        optimizer.zero_grad()
        ascent.masked_weight(weight).sum().mul(0.0).backward()
        optimizer.step()
    start = (torch.zeros(6, 8, 3, 3, 3).argmax(0) == magnitude_indices(weight, 2, 4)).float().mean()
    agreement = (ascent.indices() == magnitude_indices(weight, 2, 4)).float().mean()
    assert float(start) < 0.3 and float(agreement) > 0.9  # sampled noise leaves a few near-ties apart
