"""The harder demo: torchvision's ResNet-18 on Fashion-MNIST, pretrained here, then 2:4 masked.

One-shot magnitude 2:4 costs this network tens of points (the small demo loses 3.5), so it is
where a learned mask has something to win back. The architecture (`fmnist_resnet18` in
pipeline/nets.py) is torchvision's ResNet-18 with a 3x3 stride-2 stem for 1 channel and no
max-pool: 28x28 -> 14x14 at layer1 (a stride-1 stem, 28x28 at layer1, costs 4x the compute and
cannot be pretrained within the 30-minute `make engine` budget on 2 CPU cores; docs/baselines.md
has the measurement). Pretraining: 2 epochs, one-cycle learning rate (the stage's scheduler).
"""
from pipeline.config import (BuildConfig, DataConfig, MaskConfig, PreprocessConfig, PretrainConfig, Recipe,
                             ServeConfig, VerifyConfig)
from pipeline.data import FASHION_MNIST_LABELS


def recipe():
    return Recipe(
        name="fmnist_resnet18",
        arch="fmnist_resnet18",
        description="torchvision ResNet-18 (3x3 stride-2 stem, no max-pool) on 1x28x28 Fashion-MNIST (harder demo)",
        num_classes=10,
        input_shape=[1, 28, 28],
        weights="pretrain",
        classifier="fc",
        labels=list(FASHION_MNIST_LABELS),
        data=DataConfig(kind="fashion_mnist", batch_size=128, eval_batch_size=1000, synthetic_size=512),
        preprocess=PreprocessConfig(resize=0, crop=28, mean=[0.2860], std=[0.3530], color="L"),
        pretrain=PretrainConfig(epochs=2, lr=0.2, batch_size=128),
        # Today's schedule shape (StepLR, measured on fmnist_resnet); the step budget, warm-up + cosine and the
        # validation-split evaluations replace it in phase 2 of issue 11.
        masks=MaskConfig(epochs=1.0, batch_size=128, lr=0.01, init="magnitude", init_scale=20.0,
                         tau_start=1.0, tau_end=0.1, tau_schedule="exponential", lr_step_epochs=0.25,
                         lr_gamma=0.5, checkpoint_every=100, eval_every=117),
        build=BuildConfig(min_batch=1, opt_batch=64, max_batch=256),
        verify=VerifyConfig(serving_batch=64, latency_iters=20, warmup_iters=3, max_top1_drop=0.5,
                            min_speedup=2.0, min_coverage=0.5),
        serve=ServeConfig(max_batch_size=256, preferred_batch_sizes=[16, 64]),
    )
