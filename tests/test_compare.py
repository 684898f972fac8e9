import json

import pytest
import torch

from pipeline.cli import main
from pipeline.masks.artifact import MaskArtifact
from pipeline.masks.patterns import is_nm

SHORT = ["--set", "masks.steps=2", "--set", "data.synthetic_size=64"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    code = main(["compare", "--model", "tiny_resnet", "--out", str(out), *SHORT])
    return code, out / "tiny_resnet"


def test_compare_writes_every_method(compared):
    code, root = compared
    assert code == 0
    summary = json.loads((root / "compare.json").read_text())
    names = [row["method"] for row in summary["methods"]]
    assert names == [
        "magnitude",
        "permuted",
        "transposable",
        "transposable-greedy",
        "wanda",
        "sparsegpt",
        "adaprune",
        "learned",
    ]
    assert [row["method"] for row in summary["methods"] if row["changes_weights"]] == ["adaprune"]
    for row in summary["methods"]:
        for key in ("method", "top1", "top5", "seconds", "diversity_bits"):
            assert key in row
        assert 0.0 <= row["top1"] <= row["top5"] <= 100.0
        assert row["seconds"] >= 0.0 and 0.0 < row["kept_magnitude"] < 1.0
    rows = {row["method"]: row for row in summary["methods"]}
    assert (
        rows["transposable"]["diversity_bits"]
        < rows["magnitude"]["diversity_bits"]
        < rows["magnitude"]["unstructured_diversity_bits"]
    )
    assert rows["permuted"]["kept_magnitude"] >= rows["magnitude"]["kept_magnitude"]
    assert rows["transposable"]["kept_magnitude"] >= rows["transposable-greedy"]["kept_magnitude"]
    assert rows["permuted"]["permuted_output_max_abs_difference"] <= 1e-5
    assert summary["accuracy_meaningful"] is False and summary["best_heuristic"] in rows
    assert summary["best_heuristic"] != "adaprune"  # learned is judged against frozen-weight heuristics only
    assert isinstance(summary["learned_beats_best_heuristic"], bool)
    markdown = (root / "compare.md").read_text()
    assert markdown.startswith("# Mask methods on tiny_resnet")
    assert "| changes weights |" in markdown and "| adaprune | **yes** |" in markdown
    assert (root / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_compared_masks_are_bakeable_artifacts(compared):
    _, root = compared
    for method in ("magnitude", "transposable", "learned"):
        artifact = MaskArtifact.load(root / "compare" / f"masks.{method}.pt")
        assert artifact.method == method
        for layer in artifact.layers:
            assert is_nm(layer.mask() * torch.ones(layer.shape), 2, 4)
    transposed = MaskArtifact.load(root / "compare" / "masks.transposable.pt")
    assert all(is_nm(layer.mask().transpose(0, 1), 2, 4) for layer in transposed.layers)


def test_bad_method_names_and_missing_reuse(tmp_path, capsys):
    assert main(["compare", "--model", "tiny_resnet", "--out", str(tmp_path), "--methods", "magnitude,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert (
        main(
            ["compare", "--model", "tiny_resnet", "--out", str(tmp_path), "--methods", "learned", "--learned", "reuse"]
        )
        == 2
    )
    assert "train-masks" in capsys.readouterr().err


def test_updatable_demo(compared):
    _, root = compared
    out = str(root.parent)
    masks = str(root / "compare" / "masks.magnitude.pt")
    assert (
        main(["updatable", "--model", "tiny_resnet", "--out", out, "--masks", masks, "--finetune-steps", "2", *SHORT])
        == 0
    )
    summary = json.loads((root / "updatable.json").read_text())
    assert set(summary["results"]) == {
        "dense_original",
        "dense_updated",
        "old_masks_on_original",
        "old_masks_on_updated",
        "magnitude_on_updated",
        "learned_afresh_on_updated",
    }
    assert summary["finetune"]["relative_weight_change"] > 0
    assert (root / "dense_updated.pt").is_file()
    certificate = summary["certify_reused_masks"]["updated"]
    assert certificate["lemma_3_6"]["violations"] == 0
    assert "--weights" in summary["rebake"] and masks in summary["rebake"]


def test_permuted_masks_are_evaluated_on_singly_permuted_weights():
    """Regression: compare once applied the channel permutations twice when evaluating `permuted`."""
    from pipeline.compare.models import masked_model, method_model
    from pipeline.masks.artifact import apply_masks
    from pipeline.masks.eligibility import find_layers
    from pipeline.masks.methods import MethodContext, compute_masks
    from pipeline.recipe.registry import get_recipe
    from pipeline.recipe.weights import build_network

    recipe = get_recipe("tiny_resnet")
    torch.manual_seed(3)
    model = build_network(recipe).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    report = find_layers(model, recipe.input_shape, classifier=recipe.classifier)
    result = compute_masks("permuted", MethodContext(recipe, model, report, device=torch.device("cpu")))
    assert result.artifact.meta["permutations"], "nothing was permuted: the test would prove nothing"
    expected = build_network(recipe).eval()
    expected.load_state_dict(apply_masks(result.dense_state_dict, result.artifact))
    images = torch.randn(8, *recipe.input_shape)
    with torch.no_grad():
        reference = expected(images)
        assert torch.allclose(method_model(recipe, original, result, torch.device("cpu"))(images), reference, atol=1e-5)
        twice = masked_model(recipe, result.dense_state_dict, result.artifact, torch.device("cpu"))(images)
    assert not torch.allclose(twice, reference, atol=1e-5)  # the old bug is detectable
