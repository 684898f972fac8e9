"""A training set smaller than one batch, once the validation split is held out, fails in one line before any
work (issue 34): before, `engine --model tiny_resnet --set weights=pretrain` ended in OneCycleLR's traceback."""

from __future__ import annotations

from nm_fixtures import cli


def one_error(run) -> str:
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    return errors[0]


def test_pretraining_on_fewer_images_than_a_batch_fails_in_one_line(tmp_path):
    run = cli("engine", "--model", "tiny_resnet", "--set", "weights=pretrain", "--out", str(tmp_path))
    error = one_error(run)
    assert "pretraining needs at least one batch of 128 training images" in error, error
    assert "103 once the validation split of 25 is held out" in error and "--set pretrain.batch_size=103" in error
    assert not (tmp_path / "tiny_resnet" / "dense.pt").exists()


def test_mask_training_on_fewer_images_than_a_batch_fails_before_any_step(tmp_path):
    run = cli("train-masks", "--model", "tiny_resnet", "--set", "masks.batch_size=120", "--out", str(tmp_path))
    error = one_error(run)
    assert "mask training needs at least one batch of 120 training images" in error, error
    assert "--set masks.batch_size=103" in error and "step 0" not in run.stdout
    assert not (tmp_path / "tiny_resnet" / "masks.ckpt").exists()
