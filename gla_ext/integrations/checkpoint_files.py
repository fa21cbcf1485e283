"""Reads a Hugging Face style checkpoint directory with torch alone (no transformers,
no safetensors package): config.json plus model.safetensors / pytorch_model.bin, or their
sharded forms with an *.index.json weight map.

safetensors layout: 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the
raw little-endian tensor bytes; offsets count from the end of the header.
"""
from __future__ import annotations

import json
import os
import struct

import torch

__all__ = ["read_config", "read_weights"]

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}

_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {directory!r} (expected an fla "
                                "save_pretrained directory)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of one .safetensors file (CPU tensors sharing one buffer per file)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {header_len})")
        header = json.loads(f.read(header_len).decode("utf-8"))
        data = bytearray(f.read())     # writable, so torch.frombuffer may view it
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = list(info["shape"])
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = 1
        for s in shape:
            count *= s
        if end - begin != count * itemsize or end > len(data):
            raise ValueError(f"{path}: tensor {name!r} has inconsistent offsets {begin}..{end}")
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        flat = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=begin)
        if begin % itemsize:   # unaligned: copy out rather than view
            flat = flat.clone()
        tensors[name] = flat.view(dtype).reshape(shape)
    return tensors


def _read_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def read_weights(directory: str) -> dict[str, torch.Tensor]:
    """The state dict stored in a checkpoint directory (single file or sharded)."""
    for name in _SINGLE_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return _read_file(path)
    for name in _INDEX_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            state = {}
            for shard in sorted(set(weight_map.values())):
                state.update(_read_file(os.path.join(directory, shard)))
            return state
    raise FileNotFoundError(f"no weights in {directory!r}: expected one of "
                            f"{', '.join(_SINGLE_FILES + _INDEX_FILES)}")
