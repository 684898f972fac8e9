"""The pretrain step's artifacts: dense.pt (`DenseWeights`) and pretrain.ckpt (`PretrainCheckpoint`)."""
