"""Hugging Face weight files: safetensors read one tensor at a time, and written likewise.

The format is an 8-byte little-endian header size, a JSON header (name -> dtype, shape,
byte offsets), then the raw bytes. Reading seeks to one tensor's bytes, so importing never
holds more than one tensor of the checkpoint in host memory; bfloat16 maps to ml_dtypes'.
A model is `model.safetensors`, or shards listed by `model.safetensors.index.json`.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np

from gptjax.errors import UserError

DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64)}
NAMES = {v: k for k, v in DTYPES.items()}
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# transformers' own default shard size for save_pretrained.
MAX_SHARD_BYTES = 5 * 1000 ** 3


class Reader:
  """The tensors of a model directory, read lazily by name."""

  def __init__(self, model_dir: str):
    self.files = {}  # tensor name -> (path, dtype, shape, start, end)
    if os.path.exists(os.path.join(model_dir, INDEX)):
      with open(os.path.join(model_dir, INDEX)) as f:
        shard_names = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(model_dir, SINGLE)):
      shard_names = [SINGLE]
    else:
      raise UserError(f"{model_dir} has neither {SINGLE} nor {INDEX}; pass a Hugging Face "
                      "model directory with safetensors weights (huggingface-cli download).")
    for name in shard_names:
      self._read_header(os.path.join(model_dir, name))

  def _read_header(self, path: str):
    if not os.path.exists(path):
      raise UserError(f"weight file {path} is missing (listed by {INDEX}); download the "
                      "model again.")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      n = struct.unpack("<Q", head)[0] if len(head) == 8 else size
      if 8 + n > size:
        raise UserError(f"weight file {path} is truncated (its header needs {8 + n} bytes, "
                        f"the file has {size}); download the model again.")
      header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    for name, info in header.items():
      start, end = info["data_offsets"]
      if 8 + n + end > size:
        raise UserError(f"weight file {path} is truncated ({name} ends at byte {8 + n + end}, "
                        f"the file has {size}); download the model again.")
      if info["dtype"] not in DTYPES:
        raise UserError(f"{name} in {path} has dtype {info['dtype']}; expected one of "
                        f"{sorted(DTYPES)}; convert the checkpoint to a float dtype.")
      self.files[name] = (path, DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + start,
                          8 + n + end)

  def names(self) -> list[str]:
    return list(self.files)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.files[name][2]

  def get(self, name: str) -> np.ndarray:
    path, dtype, shape, start, end = self.files[name]
    with open(path, "rb") as f:
      f.seek(start)
      data = f.read(end - start)
    return np.frombuffer(data, dtype).reshape(shape)


def write(out_dir: str, tensors, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
  """Writes (name, array-producing callable) pairs, each called once, as one file or shards.

  Tensors are materialised one at a time; a shard's header needs every shape and dtype, so
  `tensors` is a list of (name, shape, dtype, fetch). Returns the files written.
  """
  shards, current, size = [], [], 0
  for item in tensors:
    nbytes = int(np.prod(item[1])) * np.dtype(item[2]).itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(item)
    size += nbytes
  shards.append(current)
  names = ([SINGLE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map = {}
  for file_name, shard in zip(names, shards):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype, _ in shard:
      nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
      header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape),
                      "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
      weight_map[name] = file_name
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # Tensors start 8-byte aligned.
    with open(os.path.join(out_dir, file_name), "wb") as f:
      f.write(struct.pack("<Q", len(blob)) + blob)
      for name, shape, dtype, fetch in shard:
        array = np.ascontiguousarray(fetch(), dtype=dtype)
        assert array.shape == tuple(shape), (name, array.shape, shape)
        f.write(array.tobytes())
  if len(shards) > 1:
    total = sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d, _ in tensors)
    with open(os.path.join(out_dir, INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names
