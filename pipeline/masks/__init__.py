"""N:M masks: patterns (TensorRT layout), layer eligibility, learned (Gumbel-Softmax) and heuristic masks, artifacts."""
