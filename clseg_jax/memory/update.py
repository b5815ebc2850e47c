"""Between phases: offer a finished phase's rows to the memory and rebuild it (host side).

Two passes over ``phase.batches``: the first collects what selection needs (class presence, and
features for herding), the second gathers the chosen rows, so a phase's images are never all held
in host memory at once. Model outputs (features, DER++'s logits) come from one jitted ``row_fn``
over batches padded to a fixed size: it compiles once for the whole stream.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from clseg_jax import losses, rows
from clseg_jax.memory import buffer as buffer_lib
from clseg_jax.memory import selection
from clseg_jax.strategies import base

# row_fn(params, batch_stats, images [b,H,W,3] uint8, mesh=None) -> {name: [b,...]}: "features"
# [b,C] is what herding uses, any other name is stored per row in ``Buffer.extra``.
RowFn = rows.Map


def presence(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """bool ``[N,K]``: classes present in each label (255 ignored).

    ``labels``: ``[N]`` class ids, ``[N,K]`` multi-hot, or ``[N,H,W]`` masks; for masks background
    (class 0) is left out, since nearly every image contains it and balancing on it means nothing.
    """
    n = len(labels)
    if labels.ndim == 1:
        out = np.zeros((n, num_classes), bool)
        ok = labels < num_classes
        out[np.flatnonzero(ok), labels[ok]] = True
        return out
    if labels.ndim == 2:
        return labels == 1
    flat = labels.reshape(n, int(np.prod(labels.shape[1:]))).astype(np.int64)
    flat = np.where(flat < num_classes, flat, num_classes)  # ignore -> an extra bin
    out = np.zeros((n, num_classes + 1), bool)
    np.put_along_axis(out, flat, True, axis=1)
    out = out[:, :num_classes]
    out[:, 0] = False
    return out


def pooled_features(outputs: dict[str, jax.Array]) -> jax.Array:
    """``[b,C]``: the classifier input if it is a vector, else the bottleneck's spatial mean."""
    pen = outputs.get("penultimate")
    if pen is not None and pen.ndim == 2:
        return pen
    return jnp.mean(outputs["features"].astype(jnp.float32), axis=(1, 2))


def make_features_fn(forward: base.Forward) -> RowFn:
    """A compiled ``row_fn`` giving eval-mode pooled features (for herding)."""

    def fn(params, batch_stats, images):
        out, _ = forward(params, batch_stats, images, False)
        return {"features": pooled_features(out)}

    return rows.Map(fn, whole=2)


def _padded(images: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, int]]:
    for start in range(0, len(images), size):
        chunk = images[start : start + size]
        n = len(chunk)
        if n < size:
            chunk = np.concatenate([chunk, np.zeros((size - n, *chunk.shape[1:]), chunk.dtype)])
        yield chunk, n


def apply_rows(row_fn: RowFn, params, batch_stats, images: np.ndarray, size: int) -> dict:
    """``row_fn`` over ``images [N,...]`` in padded batches of ``size`` -> ``{name: [N,...]}``.

    Every process passes all of ``images``; on a mesh each feeds only its block of each batch.
    """
    mesh = rows.mesh_for(params, size)
    parts: dict[str, list[np.ndarray]] = {}
    for chunk, n in _padded(images, size):
        for k, v in row_fn(params, batch_stats, rows.feed(chunk, mesh), mesh=mesh).items():
            parts.setdefault(k, []).append(np.asarray(v)[:n])
    return {k: np.concatenate(v) for k, v in parts.items()}


def update(
    buf: buffer_lib.Buffer,
    phase: base.Phase,
    policy: str,
    rng: np.random.Generator,
    *,
    num_classes: int,
    num_experiences: int,
    params=None,
    batch_stats=None,
    row_fn: RowFn | None = None,
    batch_size: int = 64,
) -> buffer_lib.Buffer:
    """The memory after offering it ``phase``'s training rows under ``policy``.

    ``row_fn`` (with ``params``/``batch_stats``) supplies herding's "features" and any per-row
    extras, computed with the model as it is after the phase; stored rows keep their extras.
    """
    old = buffer_lib.to_host(buf)
    extra_names = [k[len("extra/") :] for k in old if k.startswith("extra/")]
    need_rows = policy == "herding" or bool(extra_names)
    if need_rows and row_fn is None:
        raise ValueError(f"memory policy {policy!r} / extras {extra_names} need a row_fn")
    old_slots = np.flatnonzero(old["valid"])

    # Pass 1: what selection needs about the new rows.
    new_presence, new_features = [], []
    for batch in phase.batches(batch_size):
        new_presence.append(presence(batch["label"], num_classes))
        if policy == "herding":
            new_features.append(
                apply_rows(row_fn, params, batch_stats, batch["image"], batch_size)["features"]
            )
    n_new = sum(len(p) for p in new_presence)
    features = None
    if policy == "herding":
        old_f = apply_rows(row_fn, params, batch_stats, old["image"][old_slots], batch_size)
        features = np.concatenate(
            [old_f.get("features", np.zeros((0, new_features[0].shape[1]))), *new_features]
        )
    cands = selection.Candidates(
        exp=np.concatenate([old["exp"][old_slots], np.full(n_new, phase.index)]),
        presence=np.concatenate([presence(old["label"][old_slots], num_classes), *new_presence]),
        rank=np.concatenate([old["rank"][old_slots], np.full(n_new, -1)]),
        slot=np.concatenate([old_slots, np.full(n_new, -1)]),
        features=features,
    )
    chosen, rank = selection.select(
        policy, cands, buf.capacity, rng, seen=int(old["seen"]), num_experiences=num_experiences
    )

    # Pass 2: gather. Candidate i < len(old_slots) is stored slot old_slots[i]; the rest are new.
    out = {k: v.copy() for k, v in old.items()}
    n_old = len(old_slots)
    is_old = (chosen >= 0) & (chosen < n_old)
    src = old_slots[chosen[is_old]]
    for k in ["image", "label", "exp", *(f"extra/{e}" for e in extra_names)]:
        out[k][is_old] = old[k][src]
    want = {int(c) - n_old: s for s, c in enumerate(chosen) if c >= n_old}  # new row -> slot
    offset = 0
    for batch in phase.batches(batch_size):
        b = len(batch["label"])
        hits = [(i, want[offset + i]) for i in range(b) if offset + i in want]
        offset += b
        if not hits:
            continue
        picked, slots = (np.asarray(x) for x in zip(*hits, strict=True))
        out["image"][slots] = batch["image"][picked]
        out["label"][slots] = batch["label"][picked]
        out["exp"][slots] = phase.index
        if extra_names:
            extras = apply_rows(row_fn, params, batch_stats, batch["image"][picked], batch_size)
            for e in extra_names:
                out[f"extra/{e}"][slots] = extras[e]
    out["valid"] = chosen >= 0
    out["rank"] = np.where(chosen >= 0, rank, 0)
    out["exp"] = np.where(chosen >= 0, out["exp"], -1)
    out["label"][~out["valid"]] = losses.IGNORE
    out["seen"] = np.asarray(int(old["seen"]) + n_new)
    return buffer_lib.from_host(out)
