"""Stability certificates for masked classifiers: Danhofer, arXiv 2411.00288, Lemmas 3.4-3.6.

The paper's setting, in our words. A compositional classifier is f(x) = softmax(f_d(...f_1(x)))
with layers f_i(x) = sigma(W_i x + b_i) and an L-Lipschitz activation (ReLU: L = 1). Its
confidence on x is the smallest infinity-norm change of the probability vector that changes the
predicted class: with p1 >= p2 the two largest probabilities, gamma_f(x) = (p1 - p2) / 2. The
classifier is stable on x under a weight change when its predicted class does not change. A
mask B acts as the additive change mu(B, W) = (B - 1) * W (Lemma 3.3), and in the infinity
operator norm (the largest absolute row sum) ||mu(B, W)||_inf <= ||W||_inf for every mask.

* Lemma 3.4 (one given change D of layer j): stable if
      gamma_f(x) > L^d ||D|| ||x|| prod_{i != j} ||W_i||.
  Its proof first shows ||f(x) - f'(x)|| <= L^(d-j) prod_{i > j} ||W_i|| ||D|| ||x_{j-1}||, with
  x_{j-1} the dense input of layer j (A.4, eq. 30), then bounds ||x_{j-1}|| by the Lipschitz
  constant of the first j-1 layers times ||x||; that last step needs f_i(0) = 0 (no biases).
* Lemma 3.5 (any mask on layer j): Lemma 3.4 with ||D|| <= ||W_j|| (Lemma 3.3): stable if
      gamma_f(x) > L^d ||x|| prod_i ||W_i||.
* Lemma 3.6 (mask B reused after an update V_j = W_j + U_j): the masked updated layer B * V_j is
  W_j + mu(B, W_j) + B * U_j, so the masked updated classifier predicts as the ORIGINAL dense f
  whenever (infinity norms throughout)
      gamma_f(x) > L^d (||W_j|| + ||U_j||) ||x|| prod_{i != j} ||W_i||.

How this module evaluates them on a real network (ResNet-style graphs). Every norm is the
infinity norm, the one Lemmas 3.3 and 3.6 are proven in. A conv is the matrix W in R^(K x CRS)
applied to the unfolded input (the paper's eq. 5); unfolding only repeats entries and adds
padding zeros, so ||conv(x)||_inf <= ||W||_inf ||x||_inf with ||W||_inf = max_k sum_{c,r,s} |W_kcrs|.
A bound e on ||h'(x) - h(x)||_inf (h dense, h' changed) is propagated node by node, per sample,
from e = 0 at the input; every affine node (conv, linear, eval-mode BatchNorm y = a x + c) uses

      e_out <= ||W'||_inf e_in + ||W' - W||_inf ||x_in||_inf + ||b' - b||_inf

(W' the changed weights, x_in the dense input of that node), which is the proof's step
(eq. 23-27) at the node. With one changed layer this is exactly eq. 30: the dense input x_{j-1} is
used as measured, not bounded through ||x||, which keeps it valid with biases and BatchNorm
shifts. With several masked layers it is the same inequality applied at each (Lemma 3.2's
composition, with ||B * W||_inf <= ||W||_inf by Lemma 3.3). The lemma terms per masked layer:
    3.4: W' = B * W,            ||W' - W|| = ||(1 - B) * W||_inf, Lipschitz ||W||_inf
    3.5: any B,                 ||W' - W|| <= ||W||_inf,          Lipschitz ||W||_inf
    3.6: W' = B * V, V = W + U, ||W' - W|| <= ||W||_inf + ||U||_inf, Lipschitz ||V||_inf,
         and for the unmasked layers of the updated network ||W' - W|| = ||U||_inf (BatchNorm: the
         change of its scale a and shift c), since an update changes every layer.
ReLU, max and average pooling and flatten are 1-Lipschitz in the infinity norm; a residual add
sums its inputs' bounds (the one step outside the paper's chain model). The softmax is
1-Lipschitz (the paper's constant; in the infinity norm it is even 1/2), so a sample is
certified when gamma(x) > e(logits). The report gives the measured ||f~(x) - f(x)||_inf of the
logits next to every bound (it must never exceed it).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError
from pipeline.masks.artifact import MaskArtifact

SLACK = 1.0 + 1e-6  # float rounding in the norm computations must not make a bound unsound
_PASS_THROUGH = (
    nn.ReLU,
    nn.Identity,
    nn.Dropout,
    nn.Flatten,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)


# --------------------------------------------------------------------------- norms
def infinity_norm(weight: torch.Tensor) -> float:
    """Largest absolute row sum of the layer's matrix: [K, in] or a conv's unfolded [K, C*R*S]."""
    if weight.dim() == 1:  # a diagonal (BatchNorm scale)
        return float(weight.detach().double().abs().max()) * SLACK
    return float(weight.detach().double().abs().reshape(weight.shape[0], -1).sum(1).max()) * SLACK


def batchnorm_affine(state: dict[str, torch.Tensor], name: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = a x + c: (a, c) from its weight, bias and running statistics."""
    scale = state[f"{name}.weight"].double() / (state[f"{name}.running_var"].double() + eps).sqrt()
    return scale, state[f"{name}.bias"].double() - scale * state[f"{name}.running_mean"].double()


@dataclass
class AffineBound:
    """e_out <= lipschitz * e_in + weight_change * ||x_in||_inf + bias_change at one affine node."""

    lipschitz: float
    weight_change: float = 0.0
    bias_change: float = 0.0


def lemma_terms(
    modules: dict[str, nn.Module],
    state: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    lemma: str,
    updated: dict[str, torch.Tensor] | None = None,
) -> dict[str, AffineBound]:
    """Per affine module, the terms of `lemma` ("3.4", "3.5" or "3.6") against the dense `state`."""
    terms: dict[str, AffineBound] = {}
    for name, module in modules.items():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            weight = state[f"{name}.weight"]
            if lemma == "3.6":
                if updated is None:
                    raise RuntimeError("lemma 3.6 bounds an update: lemma_terms needs the updated state")
                change = updated[f"{name}.weight"] - weight
                bias = f"{name}.bias"
                bias_change = float((updated[bias] - state[bias]).abs().max()) * SLACK if bias in state else 0.0
                weight_change = infinity_norm(change) + (infinity_norm(weight) if name in masks else 0.0)
                terms[name] = AffineBound(infinity_norm(updated[f"{name}.weight"]), weight_change, bias_change)
            elif name in masks:
                pruned = weight * (1 - masks[name].to(weight))
                terms[name] = AffineBound(
                    infinity_norm(weight), infinity_norm(pruned) if lemma == "3.4" else infinity_norm(weight)
                )
            else:
                terms[name] = AffineBound(infinity_norm(weight))
        elif isinstance(module, nn.BatchNorm2d):
            scale, shift = batchnorm_affine(state, name, module.eps)
            if lemma == "3.6":
                if updated is None:
                    raise RuntimeError("lemma 3.6 bounds an update: lemma_terms needs the updated state")
                new_scale, new_shift = batchnorm_affine(updated, name, module.eps)
                terms[name] = AffineBound(
                    infinity_norm(new_scale), infinity_norm(new_scale - scale), infinity_norm(new_shift - shift)
                )
            else:
                terms[name] = AffineBound(infinity_norm(scale))
    return terms


# --------------------------------------------------------------------------- propagation
def _input_norms(x: torch.Tensor) -> torch.Tensor:
    return x.detach().flatten(1).abs().amax(dim=1).double()


class BoundPropagator:
    """Runs the dense reference network on a batch and propagates, per sample and per bound, the
    bound on the infinity-norm distance to the changed network."""

    def __init__(self, model: nn.Module, bounds: dict[str, dict[str, AffineBound]]) -> None:
        import torch.fx

        self.model = model.eval()
        self.graph = torch.fx.symbolic_trace(model).graph
        self.modules = dict(model.named_modules())
        self.bounds = bounds  # bound name -> module name -> terms

    @torch.no_grad()
    def run(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        values: dict[str, torch.Tensor] = {}
        errors: dict[str, dict[str, torch.Tensor]] = {}
        zero = torch.zeros(images.shape[0], dtype=torch.float64, device=images.device)
        for node in self.graph.nodes:
            if node.op == "placeholder":
                values[node.name] = images
                errors[node.name] = {kind: zero for kind in self.bounds}
            elif node.op == "call_module":
                module = self.modules[node.target]
                source = node.args[0]
                x = values[source.name]
                values[node.name] = module(x)
                e_in = errors[source.name]
                if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                    size = _input_norms(x)
                    errors[node.name] = {}
                    for kind, terms in self.bounds.items():
                        term = terms[node.target]
                        errors[node.name][kind] = (
                            term.lipschitz * e_in[kind] + term.weight_change * size + term.bias_change
                        )
                elif isinstance(module, _PASS_THROUGH):
                    errors[node.name] = dict(e_in)
                else:
                    raise PipelineError(
                        f"certify: {type(module).__name__} ({node.target}) has no Lipschitz rule; "
                        "supported: Conv2d, Linear, BatchNorm2d, ReLU, pooling, Flatten, residual "
                        "add (ResNet-style classifiers)"
                    )
            elif node.op == "call_function" and node.target in (operator.add, torch.add):
                a, b = node.args[0], node.args[1]
                values[node.name] = values[a.name] + values[b.name]
                errors[node.name] = {k: errors[a.name][k] + errors[b.name][k] for k in self.bounds}
            elif node.op == "call_function" and node.target in (torch.flatten, F.relu, torch.relu):
                source = node.args[0]
                values[node.name] = node.target(values[source.name], *node.args[1:], **node.kwargs)
                errors[node.name] = dict(errors[source.name])
            elif node.op == "output":
                out = node.args[0]
                return values[out.name], errors[out.name]
            else:
                name = getattr(node.target, "__name__", str(node.target))
                raise PipelineError(
                    f"certify: operation {name} ({node.name}) has no Lipschitz rule; supported are "
                    "ResNet-style graphs (conv, BN, ReLU, pooling, residual add, flatten, linear)"
                )
        raise PipelineError("certify: the traced network has no output")


def confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prediction, the paper's confidence gamma = (p1 - p2) / 2, logit margin, top probability)."""
    probabilities = logits.double().softmax(1)
    top = probabilities.topk(2, dim=1)
    top_logits = logits.double().topk(2, dim=1).values
    return (
        top.indices[:, 0],
        (top.values[:, 0] - top.values[:, 1]) / 2,
        top_logits[:, 0] - top_logits[:, 1],
        top.values[:, 0],
    )


def _summary(gamma: torch.Tensor, bound: torch.Tensor, actual: torch.Tensor, agree: torch.Tensor) -> dict:
    certified = gamma > bound
    ratio = actual / bound.clamp_min(1e-30)
    return {
        "certified_share": float(certified.double().mean()),
        "certified_samples": int(certified.sum()),
        "violations": int((certified & ~agree).sum()),  # certified but prediction changed: must be 0
        "bound_holds_share": float((actual <= bound * SLACK + 1e-6).double().mean()),  # must be 1.0
        "bound_median": float(bound.median()),
        "actual_over_bound_median": float(ratio.median()),
        "actual_over_bound_max": float(ratio.max()),
    }


@dataclass
class _Networks:
    """The dense reference with its bound propagator, the masked network, and (with an update) the same pair for
    the updated weights."""

    first: BoundPropagator
    masked: nn.Module
    second: BoundPropagator | None = None
    updated_masked: nn.Module | None = None


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu() for key, value in state.items()}


def _networks(build_model, dense_state, artifact: MaskArtifact, device, updated_state) -> _Networks:
    from pipeline.masks.artifact import apply_masks

    masks = {layer.name: layer.mask() for layer in artifact.layers}

    def network(state):
        model = build_model()
        model.load_state_dict(state)
        return model.to(device).eval()

    dense = network(dense_state)
    modules, reference = dict(dense.named_modules()), _cpu(dense_state)
    bounds = {
        "lemma_3_4": lemma_terms(modules, reference, masks, "3.4"),
        "lemma_3_5": lemma_terms(modules, reference, masks, "3.5"),
    }
    if updated_state is None:
        return _Networks(BoundPropagator(dense, bounds), network(apply_masks(dense_state, artifact)))
    bounds["lemma_3_6"] = lemma_terms(modules, reference, masks, "3.6", _cpu(updated_state))
    second = BoundPropagator(
        network(updated_state), {"lemma_3_4_updated": lemma_terms(modules, _cpu(updated_state), masks, "3.4")}
    )
    return _Networks(
        BoundPropagator(dense, bounds),
        network(apply_masks(dense_state, artifact)),
        second,
        network(apply_masks(updated_state, artifact)),
    )


def _change(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).abs().amax(dim=1)


def _batch_columns(nets: _Networks, images: torch.Tensor, add) -> None:
    """Per-sample columns of one batch: confidence, agreement, measured change and every bound."""
    logits, errors = nets.first.run(images)
    sparse_logits = nets.masked(images)
    prediction, gamma, margin, top = confidence(logits)
    for key, value in (
        ("gamma", gamma),
        ("margin", margin),
        ("confidence", top),
        ("agree", (sparse_logits.argmax(1) == prediction).double()),
        ("actual", _change(sparse_logits, logits)),
        ("actual_probability", _change(sparse_logits.softmax(1), logits.softmax(1))),
        *errors.items(),
    ):
        add(key, value)
    if nets.second is None:
        return
    if nets.updated_masked is None:
        raise RuntimeError("_networks built the updated propagator without the updated masked network")
    logits2, errors2 = nets.second.run(images)
    sparse2 = nets.updated_masked(images)
    prediction2, gamma2, _, _ = confidence(logits2)
    for key, value in (
        ("gamma_updated", gamma2),
        ("agree_updated", (sparse2.argmax(1) == prediction2).double()),
        ("actual_updated", _change(sparse2, logits2)),
        ("agree_reused", (sparse2.argmax(1) == prediction).double()),
        ("actual_reused", _change(sparse2, logits)),
        ("lemma_3_4_updated", errors2["lemma_3_4_updated"]),
    ):
        add(key, value)


def _summarise(data: dict[str, torch.Tensor], updated: bool) -> dict:
    agree = data["agree"].bool()
    report = {
        "samples": int(len(data["margin"])),
        "prediction_unchanged_share": float(agree.double().mean()),
        "gamma_median": float(data["gamma"].median()),
        "margin_median": float(data["margin"].median()),
        "confidence_median": float(data["confidence"].median()),
        "lemma_3_4": _summary(data["gamma"], data["lemma_3_4"], data["actual"], agree),
        "lemma_3_5": _summary(data["gamma"], data["lemma_3_5"], data["actual"], agree),
    }
    if updated:
        agree2, reused = data["agree_updated"].bool(), data["agree_reused"].bool()
        report["updated"] = {
            "prediction_unchanged_share": float(agree2.double().mean()),
            "prediction_as_original_share": float(reused.double().mean()),
            "lemma_3_4": _summary(data["gamma_updated"], data["lemma_3_4_updated"], data["actual_updated"], agree2),
            "lemma_3_6": _summary(data["gamma"], data["lemma_3_6"], data["actual_reused"], reused),
        }
    report["per_sample"] = data
    return report


def certify_masks(
    build_model,
    dense_state: dict[str, torch.Tensor],
    artifact: MaskArtifact,
    dataset,
    batch_size: int,
    device: torch.device,
    updated_state: dict[str, torch.Tensor] | None = None,
    progress=None,
) -> dict:
    """Share of `dataset` whose masked prediction is certified equal to the dense one (Lemmas 3.4, 3.5).

    `build_model()` returns a fresh network of the recipe's architecture. With `updated_state`
    (dense weights after an update) the masks are also certified on the updated network: Lemma
    3.4 with the updated dense network as reference, and Lemma 3.6, whose reference is the
    ORIGINAL dense network (the reused masked model predicts as the model the masks were made for)."""
    from pipeline.data.datasets import make_loader

    nets = _networks(build_model, dense_state, artifact, device, updated_state)
    columns: dict[str, list[torch.Tensor]] = {}

    def add(key: str, value: torch.Tensor) -> None:
        columns.setdefault(key, []).append(value.detach().double().cpu())

    loader = make_loader(dataset, batch_size=batch_size)
    with torch.no_grad():
        for images, _ in progress(loader) if progress else loader:
            _batch_columns(nets, images.to(device), add)
    return _summarise({key: torch.cat(parts) for key, parts in columns.items()}, updated_state is not None)
