"""Dense-weight files: the state_dicts users save through their training tools, and one-line refusals for the rest.

Accepted: a plain state_dict; one wrapped under `model`, `state_dict` or `model_state_dict` (torchvision's
reference scripts write `model`, timm's train.py and Lightning's ModelCheckpoint `state_dict`), or under
`model_ema`, `state_dict_ema` or `ema` (their EMA copies); safetensors files when the safetensors package is
installed. Keys may carry any prefix (DDP's `module.`, torch.compile's `_orig_mod.`, the attribute name a
LightningModule gives the network: `model.`, `net.`, `backbone.` ...): `fit_to_network` finds it by matching the
file's keys to the network's own state_dict, never from a list, and says what it used and what it ignored.

When a file holds both, the plain weights win, since they are what `model.state_dict()` gives back; the EMA copy
is used when it is the only one, or when the caller asks for it (`prefer_ema=True`).

Nothing but tensors and plain containers is ever built from a pickle. Files `torch.load(weights_only=True)`
reads are read so; checkpoints that also pickle other objects (Lightning's hyper-parameters, loop and callback
state; timm's and torchvision's `args`) are read by a restricted unpickler (`_restricted_load`) that builds an
inert stand-in for every class or function the pickle names and calls none of them, then keeps only tensors and
plain containers. Refused without unpickling anything: a whole pickled `nn.Module` (`torch.save(model)`), a
TorchScript archive, a text file, an empty file and anything else that is not a PyTorch file.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import io
import pickle
import pickletools
import re
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.io import readable_file

SAVE_HINT = "save the weights with torch.save(model.state_dict(), PATH)"
PLAIN_ENTRIES = ("model", "state_dict", "model_state_dict")
EMA_ENTRIES = ("model_ema", "state_dict_ema", "ema")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Enough of a legacy (non-zip) torch file to hold its object pickle ahead of the tensor bytes.
_LEGACY_HEAD_BYTES = 8 << 20


@dataclass
class WeightFile:
    state_dict: dict[str, torch.Tensor]
    entry: str | None  # the checkpoint key the weights came from; None for a plain state_dict
    ignored: list[str]  # other weight entries in the file that were not used
    others: list[str] = field(default_factory=list)  # the checkpoint's other entries (epoch, args, optimizer ...)
    stand_ins: list[str] = field(default_factory=list)  # pickled classes/functions not built (restricted reader)

    def describe(self, path: Path, full: bool = True) -> str:
        """Where the weights came from; FULL: and what else the file holds, left unused (for the notes)."""
        where = f"file {path}" + (f" (entry {self.entry!r})" if self.entry else "")
        if not full:
            return where
        if self.ignored:
            where += f"; also holds {', '.join(repr(name) for name in self.ignored)}, not used"
        if self.others:
            shown = ", ".join(self.others[:12]) + (
                f" and {len(self.others) - 12} more" if len(self.others) > 12 else ""
            )
            where += f"; other entries ignored: {shown}"
        if self.stand_ins:
            names = ", ".join(self.stand_ins[:3]) + (" ..." if len(self.stand_ins) > 3 else "")
            where += f"; pickled objects left out, none of their code run ({names})"
        return where


def read_state_dict(path: str | Path, prefer_ema: bool = False) -> dict[str, torch.Tensor]:
    """The state_dict in a weights file, unwrapped and with DDP/compile prefixes removed."""
    return read_weight_file(path, prefer_ema).state_dict


def read_weight_file(path: str | Path, prefer_ema: bool = False) -> WeightFile:
    path = Path(path)
    payload = _load_payload(path)
    state, entry, ignored = _unwrap(payload, path, prefer_ema)
    check_finite(state, f"weights file {path}")
    others = [str(key) for key in payload if key != entry and key not in ignored] if entry else []
    return WeightFile(state, entry, ignored, others, _LAST_STAND_INS.pop(str(path), []))


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or Inf (a diverged run, a damaged copy) where they are loaded, before any work."""
    for key, tensor in state.items():
        if tensor.is_floating_point() or tensor.is_complex():
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
                raise PipelineError(
                    f"{source}: tensor {key!r} holds {kind} ({bad} of {tensor.numel()} values not "
                    "finite); the weights are damaged or from a diverged run: pass weights with "
                    "finite values"
                )


def infer_num_classes(state_dict: dict[str, torch.Tensor], classifier: str | None) -> int | None:
    """Output size of the classifier head from its weight shape; None when the head is not named."""
    if not classifier:
        return None
    key = f"{classifier}.weight"
    if key not in state_dict:  # a prefixed copy (module., model. ...): the shortest key that ends with it
        key = min((name for name in state_dict if name.endswith("." + key)), key=len, default=key)
    if key not in state_dict:
        heads = [
            name.removesuffix(".weight")
            for name, tensor in state_dict.items()
            if name.endswith(".weight") and tensor.dim() in (2, 4)
        ]
        raise PipelineError(
            f"the weights have no {key!r}, so the classifier head {classifier!r} is not in them; "
            f"name the head with --classifier (the last layers in the file: {', '.join(heads[-3:])})"
        )
    return int(state_dict[key].shape[0])


@dataclass
class FittedState:
    state_dict: dict[str, torch.Tensor]  # keyed as the network's own state_dict
    prefix: str  # removed from the file's keys ("" when none)
    ignored: list[str]  # the file's keys that are not the network's (other modules of a LightningModule ...)
    copies: list[str]  # other prefixes under which the file holds a whole copy of the network (EMA ...), not used

    def describe(self, source: str) -> str:
        """What was used and ignored, in one line; empty when the file is the network's state_dict as it is."""
        parts = [f"prefix {self.prefix!r} removed (found by matching the network's keys)"] if self.prefix else []
        if self.copies:
            parts.append(f"also a whole copy under {', '.join(repr(c) for c in self.copies)}, not used")
        if self.ignored:
            shown = ", ".join(self.ignored[:4]) + (
                f" and {len(self.ignored) - 4} more" if len(self.ignored) > 4 else ""
            )
            parts.append(f"{len(self.ignored)} keys not of the network ignored ({shown})")
        return f"{source}: " + "; ".join(parts) if parts else ""


def fit_to_network(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> FittedState | None:
    """STATE keyed as EXPECTED (the network's own state_dict), with the prefix every expected key carries in the
    file removed; None when no prefix gives every key of the network. Keys under that prefix that the network
    lacks stay (the strict check refuses them); keys outside it are ignored only when the prefix is not empty."""
    if not expected:
        return None
    covered: dict[str, int] = {}
    for name in expected:
        for key in state:
            if key.endswith(name) and (len(key) == len(name) or key[-len(name) - 1] == "."):
                prefix = key[: len(key) - len(name)]
                covered[prefix] = covered.get(prefix, 0) + 1
    complete = sorted((prefix for prefix, count in covered.items() if count >= len(expected)), key=len)
    if not complete:
        return None
    prefix = complete[0]
    inside = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    outside = [key for key in state if not key.startswith(prefix)]
    if not prefix:
        return FittedState(dict(state), "", [], [])
    copies = [other for other in complete[1:] if not other.startswith(prefix)]
    ignored = [key for key in outside if not any(key.startswith(copy) for copy in copies)]
    return FittedState(inside, prefix, ignored, copies)


# --------------------------------------------------------------------------- reading
def _load_payload(path: Path):
    readable_file(path, "weights file", "check the path", empty_fix=SAVE_HINT)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if head.startswith(b"PK\x03\x04"):  # torch's zip format (or a damaged copy of it)
        _refuse_torchscript(path)
    elif _is_safetensors(head, size):
        return _load_safetensors(path)
    elif not head.startswith(b"\x80"):  # every torch.save pickle starts with the PROTO opcode
        raise PipelineError(f"weights file {path} {_not_pytorch(head)}; {SAVE_HINT}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        objects = _pickled_objects(path)
        if objects.is_module:
            raise PipelineError(
                f"weights file {path} holds a whole pickled nn.Module (torch.save(model)), which "
                f"cannot be loaded without running its code; {SAVE_HINT}"
            ) from None
        if objects.globals:  # a training tool's checkpoint: its tensors, without building its objects
            payload = _restricted_load(path)
            if payload is not None:
                _LAST_STAND_INS[str(path)] = objects.globals
                return payload
            raise PipelineError(
                f"weights file {path} holds pickled Python objects ({', '.join(objects.globals[:3])}) "
                f"and cannot be read without running their code; {SAVE_HINT}"
            ) from None
        text = _ANSI.sub("", str(exc)).strip()
        first = text.splitlines()[0][:160] if text else type(exc).__name__
        raise PipelineError(
            f"weights file {path} cannot be read ({first}); it is truncated or corrupt, {SAVE_HINT}"
        ) from None


# --------------------------------------------------------------------------- the restricted unpickler
_LAST_STAND_INS: dict[str, list[str]] = {}  # path -> the classes/functions read as stand-ins (for describe)
_REAL_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): codecs.encode,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
}


class _StandIn:
    """What every other class or function a pickle names becomes: built from any arguments, runs nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:
        pass

    def append(self, value) -> None:
        pass

    def extend(self, values) -> None:
        pass

    def __call__(self, *args, **kwargs):
        return _StandIn()


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        real = _REAL_GLOBALS.get((module, name))
        if real is not None:
            return real
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return type(f"StandIn[{module}.{name}]", (_StandIn,), {})


_RESTRICTED_PICKLE = types.SimpleNamespace(
    Unpickler=_RestrictedUnpickler,
    load=lambda handle, **kwargs: _RestrictedUnpickler(handle, **kwargs).load(),
    __name__="pipeline.recipe.weight_files restricted pickle",
)


def _restricted_load(path: Path):
    """The checkpoint's tensors and plain containers, every other object left out; None when it cannot be read."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE)
    except Exception:  # a damaged file, or torch forced to weights_only (TORCH_FORCE_WEIGHTS_ONLY_LOAD)
        return None
    return _plain(payload)


_DROPPED = object()


def _plain(value, depth: int = 0):
    """VALUE with everything but tensors, numbers, strings and plain containers of them dropped."""
    if depth > 64 or isinstance(value, _StandIn):
        return _DROPPED
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, dict):
        kept = {key: _plain(item, depth + 1) for key, item in value.items() if isinstance(key, (str, int))}
        return {key: item for key, item in kept.items() if item is not _DROPPED}
    if isinstance(value, (list, tuple)):
        return [item for item in (_plain(item, depth + 1) for item in value) if item is not _DROPPED]
    return _DROPPED


def _refuse_torchscript(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return  # torch.load reports the damage
    if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
        raise PipelineError(
            f"weights file {path} is a TorchScript archive (torch.jit.save), which cannot be loaded "
            f"without running its code; {SAVE_HINT} before scripting"
        )


def _is_zip_header(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def _not_pytorch(head: bytes) -> str:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "is not a PyTorch file (no zip archive or pickle header)"
    if "\x00" in text:
        return "is not a PyTorch file (no zip archive or pickle header)"
    if text.startswith("version https://git-lfs"):
        return "is a Git LFS pointer, not the weights (run `git lfs pull`)"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"is a text file ({first!r}...), not PyTorch weights"


def _is_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    header_length = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 8 + header_length <= size


def _load_safetensors(path: Path):
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise PipelineError(
            f"weights file {path} is a safetensors file; install the safetensors package "
            "(`pip install safetensors`) to read it"
        ) from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise PipelineError(
            f"weights file {path} is a damaged safetensors file ({_ANSI.sub('', str(exc))[:160]})"
        ) from None


@dataclass
class _PickledObjects:
    globals: list[str]  # classes and functions the pickle would import, in order
    is_module: bool  # an nn.Module's __dict__ (its _parameters and _modules) is in the pickle


def _pickled_objects(path: Path) -> _PickledObjects:
    """What a pickle references, read with pickletools (which parses opcodes and runs nothing)."""
    pickles: list[bytes] = []
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            pickles = [archive.read(name) for name in archive.namelist() if name.endswith("/data.pkl")]
    elif not _is_zip_header(path):
        with open(path, "rb") as handle:
            pickles = [handle.read(_LEGACY_HEAD_BYTES)]
    found: list[str] = []
    strings: set[str] = set()
    for data in pickles:
        stream = io.BytesIO(data)
        while stream.tell() < len(data):  # legacy files hold several pickles back to back
            recent: list[str] = []
            try:
                for opcode, argument, _ in pickletools.genops(stream):
                    if isinstance(argument, str) and "UNICODE" in opcode.name:
                        strings.add(argument)
                        recent.append(argument)
                    if opcode.name in ("GLOBAL", "INST"):
                        found.append(str(argument).replace(" ", "."))
                    elif opcode.name == "STACK_GLOBAL" and len(recent) >= 2:
                        found.append(f"{recent[-2]}.{recent[-1]}")
            except (ValueError, EOFError):  # the tensor bytes after a legacy file's pickles
                break
    unsafe = [name for name in dict.fromkeys(found) if _needs_code(name)]
    return _PickledObjects(unsafe, {"_parameters", "_modules"} <= strings)


def _needs_code(global_name: str) -> bool:
    """Whether a pickled reference is more than the tensor rebuilders and containers a state_dict uses."""
    if global_name.startswith("torch.nn.modules."):
        return True
    return not (global_name.startswith("torch.") or global_name in ("collections.OrderedDict", "argparse.Namespace"))


def _unwrap(payload, path: Path, prefer_ema: bool) -> tuple[dict[str, torch.Tensor], str | None, list[str]]:
    if not isinstance(payload, dict):
        raise PipelineError(f"weights file {path} holds a {type(payload).__name__}, not a state_dict; {SAVE_HINT}")
    if payload and all(isinstance(value, torch.Tensor) for value in payload.values()):
        return payload, None, []
    plain = [key for key in PLAIN_ENTRIES if isinstance(payload.get(key), dict)]
    ema = [key for key in EMA_ENTRIES if isinstance(payload.get(key), dict)]
    order = ema + plain if prefer_ema else plain + ema
    if not order:
        keys = ", ".join(repr(key) for key in list(payload)[:6])
        raise PipelineError(
            f"weights file {path} holds a dict ({keys}) with no state_dict: expected tensors, or "
            f"one under {', '.join(PLAIN_ENTRIES + EMA_ENTRIES)}; {SAVE_HINT}"
        )
    entry = order[0]
    state = payload[entry]
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not state or not_tensors:
        raise PipelineError(
            f"weights file {path}: entry {entry!r} is not a state_dict "
            f"({'empty' if not state else 'non-tensor values at ' + ', '.join(not_tensors[:3])}); "
            f"{SAVE_HINT}"
        )
    return state, entry, order[1:]
