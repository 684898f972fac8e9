"""Stability certificates for masked classifiers (after Danhofer, arXiv 2411.00288, sec. 3.2).

The paper's lemma texts were not available while this was written, so the statements below are
reconstructed as standard Lipschitz-composition bounds (docs/baselines.md says so too). Let f be
the dense network, f~ the same network with N:M masks on some layers, P = W * (1 - mask) the
pruned part of a masked layer's weight, v the dense activations of one sample x and
margin(x) = f_y(x) - max_{j != y} f_j(x) with y the dense prediction. Every bound E(x) below
satisfies ||f~(x) - f(x)||_2 <= E(x); since a logit difference moves by at most sqrt(2) E(x),
    margin(x) > sqrt(2) E(x)  =>  argmax f~(x) = argmax f(x)      (the sample is certified stable).
E(x) is propagated through the traced graph, per sample, from e = 0 at the input:
    masked conv/linear   e_out <= ||W~||_op e_in + ||P v_in||_2            (Lemma 3.4: the given masks)
                         e_out <= (||W||_op + pi) e_in + pi ||v_in||_2      (Lemma 3.5: any N:M masks)
    other conv/linear    e_out <= ||W||_op e_in
    BatchNorm (eval)     e_out <= max_c |gamma_c / sqrt(var_c + eps)| e_in
    ReLU, flatten        e_out <= e_in;   residual add: e_out <= e_a + e_b
    MaxPool k/s          e_out <= ceil(k/s) e_in;   global average pool: e_out <= e_in / sqrt(H W)
||W||_op of a convolution is bounded exactly by the largest singular value of its circular
embedding (FFT over the padded input grid); pi bounds ||P||_op for every admissible N:M mask:
sum over kernel positions of sqrt(sum over blocks of the M-N largest w^2).
Lemma 3.6 (masks reused after an update W -> W' = W + D, evaluated on the updated model):
    e_out <= (||W~||_op + ||D * mask||_op) e'_in + (||P||_op + ||D * (1-mask)||_op) ||v'_in||_2
needs only the old masking's norms and the size of the update. All bounds are worst case:
they hold for every input, and are therefore loose; the report also gives the measured
||f~(x) - f(x)|| next to each bound.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError
from pipeline.masks.artifact import MaskArtifact
from pipeline.masks.patterns import to_blocks

SLACK = 1.0 + 1e-4  # float rounding in the norm computations must not make a bound unsound
SQRT2 = math.sqrt(2.0)


# --------------------------------------------------------------------------- norms
def conv_operator_norm(weight: torch.Tensor, input_hw: tuple[int, int], stride=1, padding=0, dilation=1) -> float:
    """Upper bound of ||conv||_2 for a zero-padded (strided) convolution on an H x W input.

    Zero padding embeds the input isometrically into the padded grid, where the valid
    convolution is a restriction of the circular one; striding only drops outputs. So the
    largest singular value of the circular convolution on the padded grid bounds the operator
    norm; it is the max over frequencies of the spectral norm of the K x C matrix of 2-D DFTs.
    """
    weight = weight.detach().double()
    if weight.dim() == 2:
        return float(torch.linalg.matrix_norm(weight, ord=2)) * SLACK
    pad = padding if isinstance(padding, (tuple, list)) else (padding, padding)
    dil = dilation if isinstance(dilation, (tuple, list)) else (dilation, dilation)
    k, c, r, s = weight.shape
    if (r, s) == (1, 1):
        return float(torch.linalg.matrix_norm(weight[:, :, 0, 0], ord=2)) * SLACK
    if dil != (1, 1):
        dilated = weight.new_zeros(k, c, dil[0] * (r - 1) + 1, dil[1] * (s - 1) + 1)
        dilated[:, :, ::dil[0], ::dil[1]] = weight
        weight, (r, s) = dilated, dilated.shape[2:]
    grid = (max(input_hw[0] + 2 * pad[0], r), max(input_hw[1] + 2 * pad[1], s))
    spectrum = torch.fft.fft2(weight, s=grid).permute(2, 3, 0, 1).reshape(-1, k, c)
    if k < c:
        spectrum = spectrum.transpose(1, 2)
    best = 0.0
    for start in range(0, spectrum.shape[0], 256):
        part = spectrum[start:start + 256]
        gram = part.mH @ part  # Hermitian: its largest eigenvalue is sigma_max^2 (eigvalsh is much faster than SVD)
        best = max(best, float(torch.linalg.eigvalsh(gram)[:, -1].max().clamp_min(0).sqrt()))
    return best * SLACK


def worst_pruned_norm(weight: torch.Tensor, n: int, m: int) -> float:
    """pi: an upper bound of ||W * (1 - mask)||_op over every N:M mask in TensorRT layout."""
    squared = to_blocks(weight.detach().double() ** 2, m)  # [K, *kernel, C/m, m]
    worst = squared.topk(m - n, dim=-1).values.sum(-1) if m > n else torch.zeros_like(squared[..., 0])
    if weight.dim() == 2:
        return float(worst.sum().sqrt()) * SLACK
    # worst: [K, R, S, C/m] -> per kernel position the Frobenius norm of the worst pruned K x C slice
    per_position = worst.sum(dim=(0, -1)).sqrt()
    return float(per_position.sum()) * SLACK


def _operator_norm(module: nn.Module, weight: torch.Tensor, input_shape: torch.Size) -> float:
    if isinstance(module, nn.Linear):
        return conv_operator_norm(weight, (1, 1))
    return conv_operator_norm(weight, tuple(input_shape[-2:]), module.stride, module.padding, module.dilation)


def _apply(module: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(x, weight)
    return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)


# --------------------------------------------------------------------------- propagation
@dataclass
class _Layer:
    mask: torch.Tensor  # 0/1 in weight layout
    n: int
    m: int


def _norms(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1)


def _pool_factor(module: nn.Module, shape: torch.Size, name: str) -> float:
    if isinstance(module, nn.MaxPool2d):
        k = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,) * 2
        s = module.stride if isinstance(module.stride, tuple) else (module.stride,) * 2
        return math.sqrt(math.ceil(k[0] / s[0]) * math.ceil(k[1] / s[1]))
    size = module.output_size if isinstance(module.output_size, tuple) else (module.output_size,) * 2
    h, w = shape[-2], shape[-1]
    out = (size[0] or h, size[1] or w)
    if h % out[0] or w % out[1]:
        raise PipelineError(f"certify: {name} pools {h}x{w} to {out[0]}x{out[1]} with uneven windows; "
                            "no Lipschitz rule for that")
    return 1.0 / math.sqrt((h // out[0]) * (w // out[1]))


class _Propagator:
    """Runs the dense network on a batch and propagates per-sample bounds of ||f~ - f||."""

    def __init__(self, model: nn.Module, layers: dict[str, _Layer], kinds: dict[str, str],
                 old_state: dict[str, torch.Tensor] | None = None) -> None:
        import torch.fx

        self.model = model.eval()
        self.graph = torch.fx.symbolic_trace(model).graph
        self.modules = dict(model.named_modules())
        self.layers = layers
        self.kinds = kinds  # kind name -> "given" | "any" | "reused"
        self.old_state = old_state
        self.cache: dict[tuple, float] = {}

    def _norm(self, key: tuple, compute) -> float:
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def _linear_rule(self, name: str, module: nn.Module, x: torch.Tensor, errors: dict[str, torch.Tensor]):
        weight = module.weight.detach()
        full = self._norm(("W", name, tuple(x.shape[1:])), lambda: _operator_norm(module, weight, x.shape))
        layer = self.layers.get(name)
        out = {}
        for kind, rule in self.kinds.items():
            e = errors[kind]
            if layer is None:
                out[kind] = full * e
            elif rule == "given":
                kept = weight * layer.mask
                kept_norm = self._norm(("K", name, tuple(x.shape[1:])), lambda: _operator_norm(module, kept, x.shape))
                out[kind] = kept_norm * e + _norms(_apply(module, weight - kept, x))
            elif rule == "any":
                pi = self._norm(("pi", name), lambda: worst_pruned_norm(weight, layer.n, layer.m))
                out[kind] = (full + pi) * e + pi * _norms(x)
            elif rule == "reused":
                old = self.old_state[f"{name}.weight"].to(weight)
                delta = weight - old
                shape = x.shape
                old_kept = self._norm(("oK", name), lambda: _operator_norm(module, old * layer.mask, shape))
                old_pruned = self._norm(("oP", name), lambda: _operator_norm(module, old * (1 - layer.mask), shape))
                d_kept = self._norm(("dK", name), lambda: _operator_norm(module, delta * layer.mask, shape))
                d_pruned = self._norm(("dP", name), lambda: _operator_norm(module, delta * (1 - layer.mask), shape))
                out[kind] = (old_kept + d_kept) * e + (old_pruned + d_pruned) * _norms(x)
        return out

    @torch.no_grad()
    def run(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        values: dict[str, object] = {}
        errors: dict[str, dict[str, torch.Tensor]] = {}
        zero = torch.zeros(images.shape[0], dtype=torch.float64, device=images.device)
        result = None
        for node in self.graph.nodes:
            def arg(a):
                return values[a.name] if hasattr(a, "name") and a.name in values else a

            if node.op == "placeholder":
                values[node.name] = images
                errors[node.name] = {kind: zero for kind in self.kinds}
            elif node.op == "call_module":
                module = self.modules[node.target]
                source = node.args[0]
                x = values[source.name]
                values[node.name] = module(x)
                e_in = errors[source.name]
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    errors[node.name] = self._linear_rule(node.target, module, x, e_in)
                elif isinstance(module, nn.BatchNorm2d):
                    scale = (module.weight.detach() / (module.running_var + module.eps).sqrt()).abs().max()
                    errors[node.name] = {k: v * float(scale) for k, v in e_in.items()}
                elif isinstance(module, (nn.ReLU, nn.Identity, nn.Dropout, nn.Flatten)):
                    errors[node.name] = dict(e_in)
                elif isinstance(module, (nn.MaxPool2d, nn.AdaptiveAvgPool2d)):
                    factor = _pool_factor(module, x.shape, node.target)
                    errors[node.name] = {k: v * factor for k, v in e_in.items()}
                else:
                    raise PipelineError(f"certify: {type(module).__name__} ({node.target}) has no Lipschitz rule; "
                                        "supported: Conv2d, Linear, BatchNorm2d, ReLU, MaxPool2d, AdaptiveAvgPool2d, "
                                        "Flatten, residual add (ResNet-style classifiers)")
            elif node.op == "call_function" and node.target in (operator.add, torch.add):
                a, b = node.args[0], node.args[1]
                values[node.name] = arg(a) + arg(b)
                errors[node.name] = {k: errors[a.name][k] + errors[b.name][k] for k in self.kinds}
            elif node.op == "call_function" and node.target in (torch.flatten, F.relu, torch.relu):
                source = node.args[0]
                values[node.name] = node.target(values[source.name], *node.args[1:], **node.kwargs)
                errors[node.name] = dict(errors[source.name])
            elif node.op == "output":
                out = node.args[0]
                result = (values[out.name], errors[out.name])
            else:
                name = getattr(node.target, "__name__", str(node.target))
                raise PipelineError(f"certify: operation {name} ({node.name}) has no Lipschitz rule; supported are "
                                    "ResNet-style graphs (conv, BN, ReLU, pooling, residual add, flatten, linear)")
        return result


def margins(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prediction, logit margin to the runner-up, softmax confidence of the prediction)."""
    top = logits.topk(2, dim=1)
    confidence = logits.softmax(1).max(1).values
    return top.indices[:, 0], (top.values[:, 0] - top.values[:, 1]).double(), confidence


def _summary(margin: torch.Tensor, bound: torch.Tensor, actual: torch.Tensor, agree: torch.Tensor) -> dict:
    certified = margin > SQRT2 * bound
    ratio = actual / bound.clamp_min(1e-30)
    return {
        "certified_share": float(certified.double().mean()),
        "certified_samples": int(certified.sum()),
        "violations": int((certified & ~agree).sum()),  # certified but prediction changed: must be 0
        "bound_holds_share": float((actual <= bound * (1 + 1e-6) + 1e-9).double().mean()),  # must be 1.0
        "bound_median": float(bound.median()),
        "actual_over_bound_median": float(ratio.median()),
        "actual_over_bound_max": float(ratio.max()),
    }


def certify_masks(build_model, dense_state: dict[str, torch.Tensor], artifact: MaskArtifact, dataset,
                  batch_size: int, device: torch.device, updated_state: dict[str, torch.Tensor] | None = None,
                  progress=None) -> dict:
    """Share of `dataset` whose masked prediction is certified equal to the dense one.

    `build_model()` returns a fresh network of the recipe's architecture. With `updated_state`
    (dense weights after an update) the masks are also certified on the updated model, directly
    (Lemma 3.4 on W') and through the reuse bound (Lemma 3.6)."""
    from pipeline.data.datasets import make_loader
    from pipeline.masks.artifact import apply_masks

    layers = {layer.name: _Layer(layer.mask().to(device), layer.n, layer.m) for layer in artifact.layers}

    def network(state):
        model = build_model()
        model.load_state_dict(state)
        return model.to(device).eval()

    dense, masked = network(dense_state), network(apply_masks(dense_state, artifact))
    first = _Propagator(dense, layers, {"lemma_3_4": "given", "lemma_3_5": "any"})
    second = updated = updated_masked = None
    if updated_state is not None:
        old = {k: v.to(device) for k, v in dense_state.items()}
        updated, updated_masked = network(updated_state), network(apply_masks(updated_state, artifact))
        second = _Propagator(updated, layers, {"lemma_3_4_updated": "given", "lemma_3_6": "reused"}, old)
    columns: dict[str, list[torch.Tensor]] = {}

    def add(key: str, value: torch.Tensor) -> None:
        columns.setdefault(key, []).append(value.detach().double().cpu())

    loader = make_loader(dataset, batch_size=batch_size)
    batches = progress(loader) if progress else loader
    with torch.no_grad():
        for images, _ in batches:
            images = images.to(device)
            logits, errors = first.run(images)
            sparse_logits = masked(images)
            prediction, margin, confidence = margins(logits)
            add("margin", margin)
            add("confidence", confidence)
            add("agree", (sparse_logits.argmax(1) == prediction).double())
            add("actual", (sparse_logits - logits).double().norm(dim=1))
            for kind, bound in errors.items():
                add(kind, bound)
            if second is not None:
                logits2, errors2 = second.run(images)
                sparse2 = updated_masked(images)
                prediction2, margin2, _ = margins(logits2)
                add("margin_updated", margin2)
                add("agree_updated", (sparse2.argmax(1) == prediction2).double())
                add("actual_updated", (sparse2 - logits2).double().norm(dim=1))
                for kind, bound in errors2.items():
                    add(kind, bound)
    data = {key: torch.cat(parts) for key, parts in columns.items()}
    agree = data["agree"].bool()
    report = {
        "samples": int(len(data["margin"])),
        "prediction_unchanged_share": float(agree.double().mean()),
        "margin_median": float(data["margin"].median()),
        "confidence_median": float(data["confidence"].median()),
        "lemma_3_4": _summary(data["margin"], data["lemma_3_4"], data["actual"], agree),
        "lemma_3_5": _summary(data["margin"], data["lemma_3_5"], data["actual"], agree),
    }
    if second is not None:
        agree2 = data["agree_updated"].bool()
        report["updated"] = {
            "prediction_unchanged_share": float(agree2.double().mean()),
            "lemma_3_4": _summary(data["margin_updated"], data["lemma_3_4_updated"], data["actual_updated"], agree2),
            "lemma_3_6": _summary(data["margin_updated"], data["lemma_3_6"], data["actual_updated"], agree2),
        }
    report["per_sample"] = {key: value for key, value in data.items()}
    return report
