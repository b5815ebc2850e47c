"""The episodic memory: a fixed-size on-device pytree of stored rows.

Every array has a leading capacity axis ``M`` that never changes, so the compiled step that
reads the memory is compiled once for the whole stream; ``valid`` says which rows hold data.
Selection (which rows to keep) runs on the host between phases (``memory.selection``); reading
(``sample``, ``block``) runs inside the compiled step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from clseg_jax import losses


class Buffer(NamedTuple):
    """Stored rows. ``M`` = capacity; ``L`` = one label's shape: ``(H, W)`` for segmentation,
    ``()`` for a class id, ``(K,)`` for a multi-hot vector.

    Attributes:
      image: uint8 ``[M,H,W,3]``.
      label: uint8 ``[M,*L]``, the labels as the row's own phase saw them (background shift
        included).
      exp: int32 ``[M]``, the phase that produced the row (-1 where empty).
      rank: int32 ``[M]``, the row's priority within its selection group (0 = first chosen);
        herding keeps the lowest ranks when a group's quota shrinks, as iCaRL does.
      valid: bool ``[M]``.
      seen: int32 ``[]``, rows offered to the memory so far (reservoir sampling's n).
      extra: per-row arrays ``[M,...]`` a strategy stores with each row (DER++'s logits).
    """

    image: jax.Array
    label: jax.Array
    exp: jax.Array
    rank: jax.Array
    valid: jax.Array
    seen: jax.Array
    extra: dict[str, jax.Array]

    @property
    def capacity(self) -> int:
        return self.valid.shape[0]


def empty(
    capacity: int,
    image_shape: tuple[int, ...],
    label_shape: tuple[int, ...],
    extra: dict[str, tuple[tuple[int, ...], jnp.dtype]] | None = None,
) -> Buffer:
    """An empty memory of ``capacity`` rows; ``extra`` maps name -> (per-row shape, dtype)."""
    if capacity < 1:
        raise ValueError(f"memory size must be >= 1, got {capacity}")
    extra = extra or {}
    return Buffer(
        image=jnp.zeros((capacity, *image_shape), jnp.uint8),
        label=jnp.full((capacity, *label_shape), losses.IGNORE, jnp.uint8),
        exp=jnp.full((capacity,), -1, jnp.int32),
        rank=jnp.zeros((capacity,), jnp.int32),
        valid=jnp.zeros((capacity,), bool),
        seen=jnp.zeros((), jnp.int32),
        extra={k: jnp.zeros((capacity, *s), d) for k, (s, d) in extra.items()},
    )


def ignore_labels(label: jax.Array, keep: jax.Array) -> jax.Array:
    """Labels of rows where ``keep`` (``bool [N]``) is False become 255 (they add no loss)."""
    keep = keep.reshape(keep.shape + (1,) * (label.ndim - 1))
    return jnp.where(keep, label, jnp.asarray(losses.IGNORE, label.dtype))


def sample(buf: Buffer, key: jax.Array, n: int) -> tuple[dict[str, jax.Array], jax.Array]:
    """``n`` distinct rows drawn uniformly from the valid ones (in jit).

    Gumbel top-k over ``log(valid)``: without replacement, fixed shapes. With fewer than ``n``
    valid rows the rest are invalid rows, flagged False in the returned mask.

    Returns:
      rows: ``{"image": [n,H,W,3], "label": [n,*L], "exp": [n], **extra}``.
      ok: bool ``[n]``, which rows hold data.
    """
    if n > buf.capacity:
        raise ValueError(f"cannot draw {n} rows per step from a memory of {buf.capacity}")
    scores = jax.random.gumbel(key, (buf.capacity,)) + jnp.where(buf.valid, 0.0, -jnp.inf)
    _, idx = lax.top_k(scores, n)
    rows = {"image": buf.image[idx], "label": buf.label[idx], "exp": buf.exp[idx]}
    rows.update({k: v[idx] for k, v in buf.extra.items()})
    return rows, buf.valid[idx]


def block(buf: Buffer, start: int | jax.Array, size: int) -> tuple[dict[str, jax.Array], jax.Array]:
    """Rows ``start .. start+size-1`` (a fixed-size slice; ``start`` may be traced)."""

    def cut(x):
        return lax.dynamic_slice_in_dim(x, start, size, axis=0)

    rows = {"image": cut(buf.image), "label": cut(buf.label), "exp": cut(buf.exp)}
    rows.update({k: cut(v) for k, v in buf.extra.items()})
    return rows, cut(buf.valid)


def append_replay(batch: dict[str, jax.Array], rows: dict, ok: jax.Array) -> dict[str, jax.Array]:
    """The batch followed by the replayed rows: ``[B+n, ...]`` for "image" and "label".

    Rows without data are replaced by copies of the batch's own rows with ignored labels, so the
    step's shape is fixed and BatchNorm sees real images while they add nothing to the loss.
    """
    n, b = ok.shape[0], batch["image"].shape[0]
    filler = jnp.arange(n) % b
    okx = ok.reshape(n, 1, 1, 1)
    image = jnp.where(okx, rows["image"], batch["image"][filler])
    label = ignore_labels(rows["label"].astype(batch["label"].dtype), ok)
    return {
        **batch,
        "image": jnp.concatenate([batch["image"], image]),
        "label": jnp.concatenate([batch["label"], label]),
    }


def to_host(buf: Buffer) -> dict[str, np.ndarray]:
    """The memory as numpy arrays (between phases), ``extra`` flattened into the dict."""
    host = jax.device_get(buf)
    out = {f: np.asarray(getattr(host, f)) for f in ("image", "label", "exp", "rank", "valid")}
    out["seen"] = np.asarray(host.seen)
    out.update({f"extra/{k}": np.asarray(v) for k, v in host.extra.items()})
    return out


def from_host(arrays: dict[str, np.ndarray]) -> Buffer:
    """Inverse of ``to_host``."""
    prefix = "extra/"
    extra = {k[len(prefix) :]: jnp.asarray(v) for k, v in arrays.items() if k.startswith(prefix)}
    return Buffer(
        image=jnp.asarray(arrays["image"]),
        label=jnp.asarray(arrays["label"]),
        exp=jnp.asarray(arrays["exp"], jnp.int32),
        rank=jnp.asarray(arrays["rank"], jnp.int32),
        valid=jnp.asarray(arrays["valid"], bool),
        seen=jnp.asarray(arrays["seen"], jnp.int32),
        extra=extra,
    )
