"""A tiny ResNet on synthetic 1x28x28 data: exercises every stage in seconds (tests, smoke runs)."""
from pipeline.recipe.config import (BuildConfig, DataConfig, MaskConfig, PreprocessConfig, Recipe, ServeConfig,
                             VerifyConfig)


def recipe():
    return Recipe(
        name="tiny_resnet",
        arch="tiny_resnet",
        description="tiny ResNet, random weights, synthetic data: a smoke test of the pipeline, not a model",
        num_classes=10,
        input_shape=[1, 28, 28],
        weights="random",
        classifier="fc",
        data=DataConfig(kind="synthetic", batch_size=32, eval_batch_size=64, synthetic_size=128),
        preprocess=PreprocessConfig(resize=0, crop=28, mean=[0.5], std=[0.25], color="L"),
        masks=MaskConfig(epochs=1.0, batch_size=32, lr=0.05, checkpoint_every=2),
        build=BuildConfig(min_batch=1, opt_batch=8, max_batch=16),
        verify=VerifyConfig(serving_batch=8, latency_iters=5, warmup_iters=1, max_top1_drop=100.0,
                            min_speedup=2.0, min_coverage=0.5),
        serve=ServeConfig(max_batch_size=16, preferred_batch_sizes=[4, 8]),
    )
