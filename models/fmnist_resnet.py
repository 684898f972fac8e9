"""The offline demo: a small ResNet on Fashion-MNIST, pretrained here, then 2:4 masked."""
from pipeline.recipe.config import (BuildConfig, DataConfig, MaskConfig, PreprocessConfig, PretrainConfig, Recipe,
                             ServeConfig, VerifyConfig)
from pipeline.data.datasets import FASHION_MNIST_LABELS


def recipe():
    return Recipe(
        name="fmnist_resnet",
        arch="small_resnet",
        description="ResNet-style network for 1x28x28 Fashion-MNIST (demo, runs offline on 2 CPU cores)",
        num_classes=10,
        input_shape=[1, 28, 28],
        weights="pretrain",
        classifier="fc",
        labels=list(FASHION_MNIST_LABELS),
        data=DataConfig(kind="fashion_mnist", batch_size=128, eval_batch_size=1000, synthetic_size=512),
        preprocess=PreprocessConfig(resize=0, crop=28, mean=[0.2860], std=[0.3530], color="L"),
        pretrain=PretrainConfig(epochs=8, lr=0.2, batch_size=128),
        # Measured on this recipe (README): init_scale 20 keeps sampling near the magnitude mask, and
        # halving the learning rate every half epoch lets the argmax settle instead of drifting.
        masks=MaskConfig(epochs=2.0, batch_size=128, lr=0.01, init="magnitude", init_scale=20.0,
                         tau_start=1.0, tau_end=0.1, tau_schedule="exponential", lr_step_epochs=0.5,
                         lr_gamma=0.5, checkpoint_every=100, eval_every=100),
        build=BuildConfig(min_batch=1, opt_batch=64, max_batch=256),
        verify=VerifyConfig(serving_batch=64, latency_iters=50, warmup_iters=5, max_top1_drop=0.5,
                            min_speedup=2.0, min_coverage=0.5),
        serve=ServeConfig(max_batch_size=256, preferred_batch_sizes=[16, 64]),
    )
