"""The speed-up bound: the best end-to-end speed-up 2:4 can give this engine, beside the one measured.

From the dense engine's per-layer GPU times (its IProfiler times, grouped per PyTorch module and per fused
block by pipeline.backends.tensorrt.sparsity.module_layer_times): a layer the sparse engine runs with sparse
kernels can be at most 2x faster (2:4 halves the multiply-adds; NVIDIA's Ampere sparsity white paper and
cuSPARSELt quote up to 2x on the math), every other layer, reformat and unmapped time 1x. So with T the dense
total and S the dense time of the layers that run sparse kernels, the bound is T / (T - S/2). A user who asked
`min_speedup` 2x sees, layer by layer, why the engine gives what it gives.

Which layers run sparse kernels comes from the sparse engine's evidence (sparse_layer_report): a module credited
one by one, or a fused block that runs sparse tactics as a whole (then the block is the unit: its time is never
split among its modules). Dense and sparse per-layer times are joined per module or block, not by raw TensorRT
layer names (the two builds fuse and name layers differently).
"""

from __future__ import annotations

from typing import Any

MAX_LAYER_SPEEDUP = 2.0


def _units(grouped: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{unit: {kind, modules, ms}} from module_layer_times' output; a block's unit is its module list."""
    units = {name: {"kind": "layer", "modules": [name], "ms": ms} for name, ms in grouped["modules"].items()}
    for block in grouped["blocks"].values():
        key = "block[" + ", ".join(block["modules"]) + "]"
        entry = units.setdefault(key, {"kind": "block", "modules": block["modules"], "ms": 0.0})
        entry["ms"] += block["ms"]
    return units


def _runs_sparse(unit: dict[str, Any], evidence: dict[str, Any]) -> bool | None:
    picked = evidence.get("picked_sparse")
    blocks = [set(block["modules"]) for block in evidence.get("sparse_blocks") or []]
    if picked is None and not blocks:
        return None
    modules = set(unit["modules"])
    if unit["kind"] == "layer":
        return bool(modules & set(picked or [])) or any(modules <= block for block in blocks)
    return bool(modules & set(picked or [])) or any(modules & block for block in blocks)


def speedup_bound(
    dense: dict[str, Any] | None, sparse: dict[str, Any] | None, evidence: dict[str, Any] | None, measured: float | None
) -> dict[str, Any]:
    """DENSE/SPARSE: module_layer_times of each engine (None when there are no per-layer times); EVIDENCE: the
    sparse engine's sparse_layer_report; MEASURED: the end-to-end speed-up verify measured."""
    if not dense or not (dense["modules"] or dense["blocks"]):
        return {"bound": None, "measured": measured, "layers": [], "note": "no per-layer GPU times of the dense engine"}
    units = _units(dense)
    sparse_units = _units(sparse) if sparse else {}
    total = sum(unit["ms"] for unit in units.values()) + dense["reformat_ms"] + dense["other_ms"]
    rows, known = [], evidence is not None
    for key, unit in sorted(units.items(), key=lambda item: -item[1]["ms"]):
        runs = _runs_sparse(unit, evidence) if evidence is not None else None
        known = known and runs is not None
        other = sparse_units.get(key, {}).get("ms")
        rows.append(
            {
                "unit": key,
                "kind": unit["kind"],
                "dense_ms": unit["ms"],
                "share": unit["ms"] / total if total else 0.0,
                "sparse_kernels": runs,
                "bound": MAX_LAYER_SPEEDUP if runs else 1.0,
                "sparse_ms": other,
                "measured": unit["ms"] / other if other else None,
            }
        )
    if not known:
        return {
            "bound": None,
            "measured": measured,
            "layers": rows,
            "note": "which layers run sparse kernels is not known (no builder-log pick line, no sparse tactic name)",
        }
    fast = sum(row["dense_ms"] for row in rows if row["sparse_kernels"])
    bound = total / (total - fast / MAX_LAYER_SPEEDUP) if total else None
    return {
        "bound": bound,
        "measured": measured,
        "sparse_time_share": fast / total if total else 0.0,
        "dense_total_ms": total,
        "layers": rows,
        "note": f"at most {MAX_LAYER_SPEEDUP:g}x on the layers with sparse kernels, 1x elsewhere, from the dense "
        "engine's per-layer GPU times",
    }


def bound_section(
    runners, layer_times: dict[str, Any], names, evidence: dict[str, Any] | None, measured: float | None
) -> dict[str, Any]:
    """The bound for a pair of runners that can give their inspector JSON (TensorRT); else why there is none."""
    from pipeline.backends.tensorrt.sparsity import module_layer_times

    if not all(hasattr(runner, "inspector_json") for runner in runners.values()):
        return {"bound": None, "measured": measured, "layers": [], "note": "needs TensorRT per-layer times"}
    grouped = {
        variant: module_layer_times(layer_times[variant], runner.inspector_json(), names)
        if layer_times.get(variant)
        else None
        for variant, runner in runners.items()
    }
    return speedup_bound(grouped["dense"], grouped["sparse"], evidence, measured)
