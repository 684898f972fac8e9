"""Shared settings of the torchvision ImageNet recipes."""
from pipeline.recipe.config import (BuildConfig, DataConfig, MaskConfig, PreprocessConfig, Recipe, ServeConfig,
                             VerifyConfig)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def imagenet_recipe(name: str, arch: str, classifier: str, description: str) -> Recipe:
    return Recipe(
        name=name,
        arch=arch,
        description=description,
        num_classes=1000,
        input_shape=[3, 224, 224],
        weights="torchvision",
        classifier=classifier,
        data=DataConfig(kind="imagefolder", root="", train_split="train", eval_split="val", batch_size=64,
                        eval_batch_size=64, workers=4, synthetic_size=64),
        preprocess=PreprocessConfig(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, color="RGB"),
        # AdamW on the logits only with StepLR (as the paper); the schedule is the one measured on the
        # demo recipe, not tuned on ImageNet here (no ImageNet on these machines).
        masks=MaskConfig(epochs=1.0, batch_size=64, lr=0.01, lr_step_epochs=0.25, lr_gamma=0.5, tau_start=1.0,
                         tau_end=0.1, checkpoint_every=500, init="magnitude"),
        build=BuildConfig(min_batch=1, opt_batch=32, max_batch=64),
        verify=VerifyConfig(serving_batch=32, latency_iters=20, warmup_iters=5, max_top1_drop=2.0,
                            min_speedup=2.0, min_coverage=0.5),
        serve=ServeConfig(max_batch_size=64, preferred_batch_sizes=[8, 32]),
    )
