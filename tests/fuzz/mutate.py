"""Hypothesis strategies that damage valid files: JSON documents (a value replaced by one of another type,
a key removed or added, a container nested far too deep, NaN and infinities, text cut or flipped),
arbitrary bytes (flips, cuts, insertions, zeroed runs), and safetensors files (their header's JSON, or
their tensors: NaN/inf, another dtype, another shape, one missing or extra).

Each strategy takes the valid content and draws one damaged variant of it; the tests write it in place
of the original and check that mechfaith refuses it in one line (or reads it, when it is still valid).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from hypothesis import strategies as st
from safetensors.torch import load as load_safetensors

# values that break assumptions: huge and negative integers, non-finite floats, odd strings
ODD_INTS = st.sampled_from([0, -1, 1, 2, 3, 7, 2**31, -2**31, 2**53 + 1, 2**63, 10**30, -10**30])
ODD_FLOATS = st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 1e-320, 1e308, -1.5, 0.5])
ODD_TEXT = st.sampled_from(["", "x", "NaN", "inf", "none", "relu", "topk", "../../x", "/etc/passwd", "a" * 300,
                            "\u00e9\u4e2d", "\x00", "cuda:7", "float64", "{", "[]"])
SCALARS = st.one_of(st.none(), st.booleans(), ODD_INTS, st.integers(-10**6, 10**6), ODD_FLOATS,
                    st.floats(allow_nan=True, allow_infinity=True), ODD_TEXT, st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
DEPTHS = st.sampled_from([63, 64, 65, 200, 5000, 100_000])
_PLACEHOLDER = "\ue000deep\ue000"


def _nodes(obj: Any, path: tuple[Any, ...] = (), out: list[tuple[Any, ...]] | None = None) -> list[tuple[Any, ...]]:
    """Paths (keys and indices) of every value in ``obj``, the root first."""
    out = [] if out is None else out
    out.append(path)
    if len(out) > 2000:
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            _nodes(v, (*path, k), out)
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:50]):
            _nodes(v, (*path, i), out)
    return out


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    _get(obj, path[:-1])[path[-1]] = value
    return obj


def _retyped(value: Any) -> list[Any]:
    """The same value as other JSON types."""
    return [str(value), [value], {"value": value}, None, isinstance(value, (int, float)) and not value,
            json.dumps(value) if not isinstance(value, float) else repr(value)]


@st.composite
def json_text(draw: st.DrawFn, data: Any) -> str:
    """``data`` (a parsed JSON document) damaged once, as text (``NaN``/``Infinity`` allowed)."""
    obj = json.loads(json.dumps(data))
    path = draw(st.sampled_from(_nodes(obj)))
    op = draw(st.sampled_from(["replace", "retype", "delete", "add", "deep", "text"]))
    if op == "replace":
        obj = _set(obj, path, draw(VALUES))
    elif op == "retype":
        obj = _set(obj, path, draw(st.sampled_from(_retyped(_get(obj, path)))))
    elif op == "delete" and path:
        parent = _get(obj, path[:-1])
        del parent[path[-1]]
    elif op == "add":
        node = _get(obj, path)
        if isinstance(node, dict):
            node[draw(st.text(max_size=8))] = draw(VALUES)
        elif isinstance(node, list):
            node.insert(draw(st.integers(0, len(node))), draw(VALUES))
        else:
            obj = _set(obj, path, [node, draw(VALUES)])
    elif op == "deep":
        obj = _set(obj, path, _PLACEHOLDER)
        depth = draw(DEPTHS)
        opener = draw(st.sampled_from(["[", '{"a":']))
        closer = "]" if opener == "[" else "}"
        return json.dumps(obj).replace(json.dumps(_PLACEHOLDER), opener * depth + "1" + closer * depth)
    text = json.dumps(obj, allow_nan=True)
    if op == "text":
        raw = draw(damaged_bytes(text.encode("utf-8")))
        return raw.decode("utf-8", "replace")
    return text


@st.composite
def damaged_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a byte flipped, cut short, bytes inserted, a run zeroed (or set to 0xff), or junk appended."""
    n = len(data)
    op = draw(st.sampled_from(["flip", "cut", "insert", "zero", "append"] if n else ["append"]))
    if op == "flip":
        i = draw(st.integers(0, n - 1))
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    if op == "cut":
        return data[:draw(st.integers(0, n - 1))]
    if op == "insert":
        i = draw(st.integers(0, n))
        return data[:i] + draw(st.binary(min_size=1, max_size=16)) + data[i:]
    if op == "zero":
        i = draw(st.integers(0, n - 1))
        j = draw(st.integers(i + 1, min(n, i + 64)))
        return data[:i] + draw(st.sampled_from([b"\x00", b"\xff"])) * (j - i) + data[j:]
    return data + draw(st.binary(min_size=1, max_size=64))


def split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, tensor bytes) of a valid safetensors file."""
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size]), data[8 + size:]


def join_safetensors(header_text: str, body: bytes) -> bytes:
    raw = header_text.encode("utf-8", "replace")
    return struct.pack("<Q", len(raw)) + raw + body


DTYPES = st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
                          torch.bool])


@st.composite
def damaged_tensors(draw: st.DrawFn, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with one of them made non-finite, of another dtype or shape, removed, renamed, or one added."""
    out = {k: v.clone() for k, v in tensors.items()}
    if not out:
        return {"x": torch.zeros(2)}
    name = draw(st.sampled_from(sorted(out)))
    t = out[name]
    op = draw(st.sampled_from(["nonfinite", "dtype", "shape", "drop", "rename", "extra", "empty", "scale"]))
    if op == "nonfinite" and t.is_floating_point() and t.numel():
        flat = t.flatten()
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf"),
                                                                               float("-inf")]))
        out[name] = flat.reshape(t.shape)
    elif op == "dtype":
        out[name] = t.to(draw(DTYPES))
    elif op == "shape":
        shapes = [t.flatten(), t.reshape(1, *t.shape), t[..., :-1] if t.ndim and t.shape[-1] else t.reshape(-1, 1),
                  t.flatten()[:1], t.T if t.ndim == 2 else t.reshape(1, -1), torch.zeros(0)]
        out[name] = draw(st.sampled_from(shapes)).contiguous()
    elif op == "drop":
        del out[name]
    elif op == "rename":
        out[name + draw(st.sampled_from(["_", ".weight", "X"]))] = out.pop(name)
    elif op == "extra":
        out[draw(st.sampled_from(["extra", "W_skip", "threshold", "b_dec_out", "W_enc"]))] = torch.zeros(3, 2)
    elif op == "empty":
        out = {}
    else:
        out[name] = (t.double() * draw(st.sampled_from([1e30, 1e300, -1.0, 0.0]))).to(t.dtype) \
            if t.is_floating_point() else t
    return out


def bytes_of_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


# ------------------------------------------------------------------ one damaged file of an input folder
@dataclass(frozen=True)
class Damage:
    """What a generated case does to a valid input folder: ``file`` (a path inside it) gets ``content``,
    or ``content(old bytes)`` when it is a function (the explicit regression examples use functions);
    with ``checksum`` = (a JSON file in the folder, a key path like ``shards/1/0/sha256``), the SHA-256
    recorded there is updated to the new content (so the checks behind the checksum are reached)."""

    file: str
    content: bytes | Callable[[bytes], bytes]
    checksum: tuple[str, str] | None = None

    def apply(self, folder: Path) -> None:
        path = folder / self.file
        new = self.content(path.read_bytes()) if callable(self.content) else self.content
        path.write_bytes(new)
        if self.checksum is not None:
            json_file, keys = self.checksum
            doc = json.loads((folder / json_file).read_text())
            node = doc
            *parents, last = keys.split("/")
            for k in parents:
                node = node[int(k) if isinstance(node, list) else k]
            node[int(last) if isinstance(node, list) else last] = hashlib.sha256(new).hexdigest()
            (folder / json_file).write_text(json.dumps(doc))


def json_edit(edit: Callable[[Any], Any]) -> Callable[[bytes], bytes]:
    """A :class:`Damage` content that parses the JSON file, calls ``edit`` on it (which changes it in
    place, or returns a replacement) and writes it back."""

    def apply(old: bytes) -> bytes:
        doc = json.loads(old)
        new = edit(doc)
        return json.dumps(doc if new is None else new).encode()

    return apply


def tensors_edit(edit: Callable[[dict[str, torch.Tensor]], Any]) -> Callable[[bytes], bytes]:
    """A :class:`Damage` content that edits a safetensors file's tensors in place."""

    def apply(old: bytes) -> bytes:
        tensors = dict(load_safetensors(old))
        edit(tensors)
        return bytes_of_tensors(tensors)

    return apply


@st.composite
def damage_of(draw: st.DrawFn, folder: Path, file: str, checksum: tuple[str, str] | None = None) -> Damage:
    """One :class:`Damage` of ``folder/file``: JSON damage for a .json file; bytes, header or tensors for a
    safetensors file (with ``checksum`` kept consistent or not); bytes for anything else."""
    data = (folder / file).read_bytes()
    if file.endswith(".json"):
        return Damage(file, draw(json_text(json.loads(data))).encode("utf-8", "surrogatepass"))
    if not file.endswith(".safetensors"):
        return Damage(file, draw(damaged_bytes(data)))
    how = draw(st.sampled_from(["bytes", "header", "tensors"]))
    if how == "bytes":
        new = draw(damaged_bytes(data))
    elif how == "header":
        header, body = split_safetensors(data)
        new = join_safetensors(draw(json_text(header)), body)
    else:
        new = bytes_of_tensors(draw(damaged_tensors(dict(load_safetensors(data)))))
    return Damage(file, new, checksum if checksum is not None and draw(st.booleans()) else None)
