"""A model family's mapping: one row a gptjax parameter, naming the Hugging Face tensors it
is made of and the transform each way; the same table serves import and export."""

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Row:
  path: tuple[str, ...]  # gptjax parameter path, e.g. ("block_0", "attn", "qkv").
  hf: tuple[str, ...]  # Hugging Face tensor names, in the order `join` takes them.
  join: Callable[..., np.ndarray]  # HF tensors -> the parameter.
  split: Callable[[np.ndarray], tuple[np.ndarray, ...]]  # The parameter -> HF tensors.
  vocab_axis: int | None = None  # The axis indexed by token id (grown and padded on import).


def same(path, name, vocab_axis=None) -> Row:
  return Row(path, (name,), lambda x: x, lambda p: (p,), vocab_axis)


def transposed(path, name, vocab_axis=None) -> Row:
  """A torch Linear weight [out, in] as gptjax's [in, out]."""
  return Row(path, (name,), lambda x: x.T, lambda p: (p.T,), vocab_axis)


def reshaped(path, name, shape, hf_shape) -> Row:
  return Row(path, (name,), lambda x: x.reshape(shape), lambda p: (p.reshape(hf_shape),))


def param(params, path):
  for key in path:
    params = params[key]
  return params
