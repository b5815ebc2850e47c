"""Class-incremental segmentation from a *locally prepared* TensorFlow Datasets dataset.

Reads with ``tfds.data_source`` (random access, no TensorFlow needed), so the dataset must have
been prepared in the ``array_record`` format (``download_and_prepare(file_format=
"array_record")``, or ``tfds build --file_format=array_record``); nothing is downloaded here.
Elements become ``{"image": uint8 [S,S,3], "label": uint8 [S,S]}`` on the same canvas as the
folder loaders (``files.fit_canvas``), so streams from tfds and from folders are
interchangeable.

Masks are mapped to class ids by a LUT (``label_map``: value -> class, others unchanged), then,
with ``fg_class_key``, pixels of class 1 take the class ``1 + element[fg_class_key]`` (a
per-image class label, e.g. the pet's species). Presets (``PRESETS``; chosen by
``config.preset`` or the dataset name):

* ``oxford_iiit_pet``: ``segmentation_mask`` trimap 1 pet / 2 background / 3 border -> 1 / 0 /
  255; pet pixels become cat (1) or dog (2) by ``species``: 3 classes, protocol "1-1".
* ``scene_parse150``: ``annotation``, 0 = "other" (background in training, ignored at test as in
  ``data/ade.py``), classes ``ade.CLASS_NAMES``, protocol "100-50". Caution: tfds builds this
  dataset's masks from the challenge's *instance* annotations (``annotations_instance.tar``,
  3-channel PNG), not from the semantic ``ADEChallengeData2016`` ones; channel
  ``label_channel`` (0) is read. Check the ids against ``data/ade.py`` on the same images
  before comparing with the papers.

Config fields (``make``): ``tfds_name`` (required), ``data_dir`` (tfds's default if empty),
``preset``, ``image_key``, ``label_key``, ``label_map`` / ``test_label_map`` (``{value: class}``
or ``[[value, class], ...]``), ``fg_class_key``, ``label_channel``, ``class_names``,
``train_split`` / ``test_split`` (tfds split strings), ``protocol``, ``setting``
(``data/incremental.py``), ``image_size`` (512), ``cache_dir`` (presence cache).
"""

from __future__ import annotations

import hashlib
import os

import ml_collections
import numpy as np

from clseg_jax.data import ade, base, checks, files, incremental

PRESETS: dict[str, dict] = {
    "oxford_iiit_pet": {
        "image_key": "image",
        "label_key": "segmentation_mask",
        "label_map": {1: 1, 2: 0, 3: base.IGNORE},
        "fg_class_key": "species",
        "class_names": ("background", "cat", "dog"),
        "train_split": "train",
        "test_split": "test",
        "protocol": "1-1",
    },
    "scene_parse150": {
        "image_key": "image",
        "label_key": "annotation",
        "test_label_map": {0: base.IGNORE},
        "class_names": ade.CLASS_NAMES,
        "train_split": "train",
        "test_split": "test",
        "protocol": "100-50",
    },
}
_DEFAULTS = {
    "image_key": "image",
    "label_key": "segmentation_mask",
    "label_map": None,
    "test_label_map": None,
    "fg_class_key": None,
    "label_channel": 0,
    "class_names": None,
    "train_split": "train",
    "test_split": "test",
    "protocol": "joint",
}


def _lut(pairs, where: str) -> np.ndarray | None:
    """``{value: class}`` or ``[[value, class], ...]`` -> a LUT (others unchanged), or None."""
    if pairs is None:
        return None
    items = pairs.items() if hasattr(pairs, "items") else pairs
    try:
        pairs = {int(v): int(c) for v, c in items}
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: must map mask values to classes, {{value: class}} or [[value, class], ...]"
        ) from None
    if any(not 0 <= x <= 255 for kv in pairs.items() for x in kv):
        raise ValueError(f"{where}: values and classes must be in 0..255, got {pairs}")
    return files.lut_from_pairs(pairs)


def open_source(name: str, split: str, data_dir: str | None, decoders=None):
    """``tfds.data_source`` with one-line errors; never downloads."""
    import tensorflow_datasets as tfds  # heavy: only when a tfds stream is built

    try:
        return tfds.data_source(
            name, split=split, data_dir=data_dir, download=False, decoders=decoders
        )
    except Exception as err:  # tfds raises many types (not found, bad split, tfrecord format)
        raise ValueError(
            f"tfds_seg: cannot open {name!r} split {split!r} in data_dir {data_dir!r} "
            f"({checks.one_line(err)}); prepare it first with file_format='array_record'"
        ) from None


class TfdsSource:
    """A prepared tfds split as a source of fixed-size segmentation elements.

    Args:
        name / split / data_dir: what ``tfds.data_source`` opens.
        image_key / label_key: feature names of the image and the mask.
        size: canvas side S (``files.fit_canvas``).
        label_map: LUT ``uint8 [256]`` applied to mask values.
        num_classes: labels outside ``0..K-1`` (255 excepted) are an error.
        fg_class_key: per-element class feature; class-1 pixels become ``1 + element[key]``.
        label_channel: channel read from a multi-channel mask.
    """

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | None,
        image_key: str,
        label_key: str,
        size: int,
        *,
        label_map: np.ndarray | None = None,
        num_classes: int | None = None,
        fg_class_key: str | None = None,
        label_channel: int = 0,
    ):
        self.tfds_name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.label_key, self.fg_class_key = image_key, label_key, fg_class_key
        self.size = int(size)
        self.label_map = files.check_lut(label_map, f"tfds_seg {name}")
        self.num_classes = num_classes
        self.label_channel = int(label_channel)
        self.name = f"tfds_seg/{name}/{split}"
        self._ds = open_source(name, split, data_dir)
        self._labels_only = None
        self._n = len(self._ds)
        example = self._ds[0] if self._n else {}
        for key in (image_key, label_key, fg_class_key):
            if key is not None and self._n and key not in example:
                raise ValueError(f"{self.name}: no feature {key!r}; features are {sorted(example)}")

    def __len__(self) -> int:
        return self._n

    def _to_label(self, element: dict) -> np.ndarray:
        mask = np.asarray(element[self.label_key])
        if mask.ndim == 3:
            mask = mask[..., self.label_channel]
        if mask.dtype != np.uint8:
            if mask.size and (mask.min() < 0 or mask.max() > 255):
                raise ValueError(f"{self.name}: mask values exceed 0..255")
            mask = mask.astype(np.uint8)
        if self.label_map is not None:
            mask = self.label_map[mask]
        if self.fg_class_key is not None:
            cls = 1 + int(np.asarray(element[self.fg_class_key]))
            mask = np.where(mask == 1, np.uint8(cls), mask)
        if self.num_classes is not None:
            base.check_labels(mask, self.num_classes, self.name)
        return mask

    def label(self, i: int) -> np.ndarray:
        """Element i's mask at its own resolution (the image is not decoded)."""
        if self._labels_only is None:
            import tensorflow_datasets as tfds

            skip = {self.image_key: tfds.decode.SkipDecoding()}
            self._labels_only = open_source(self.tfds_name, self.split, self.data_dir, skip)
        return self._to_label(self._labels_only[i])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        element = self._ds[int(i)]
        image = np.asarray(element[self.image_key], np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[-1] == 1:  # grayscale
            image = np.repeat(image, 3, axis=-1)
        label = self._to_label(element)
        if image.shape[:2] != label.shape:
            raise ValueError(
                f"{self.name}: element {i}: mask {list(label.shape)} and image "
                f"{list(image.shape[:2])} differ in size"
            )
        return files.fit_canvas(image[..., :3], label, self.size)

    def fingerprint(self) -> str:
        """Hash of the prepared files (names, modification times) and the label mapping."""
        import tensorflow_datasets as tfds

        path = tfds.builder(self.tfds_name, data_dir=self.data_dir).data_path
        digest = hashlib.sha256(
            f"{self.split}\0{self.label_key}\0{self.fg_class_key}\0{self.label_channel}".encode()
        )
        for entry in sorted(os.listdir(path)):
            digest.update(f"{entry}\0{os.stat(os.path.join(path, entry)).st_mtime_ns}\0".encode())
        if self.label_map is not None:
            digest.update(self.label_map.tobytes())
        return digest.hexdigest()[:32]

    def __getstate__(self) -> dict:
        # Data sources reopen in the receiving process (grain workers): only names travel.
        return {**self.__dict__, "_ds": None, "_labels_only": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._ds = open_source(self.tfds_name, self.split, self.data_dir)

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, n={len(self)}, size={self.size})"


def _setting(cfg: ml_collections.ConfigDict, preset: dict, key: str):
    value = cfg.get(key, None)
    if value is None or (isinstance(value, str | tuple | list) and not value):
        return preset.get(key, _DEFAULTS[key])
    return value


def make(cfg: ml_collections.ConfigDict) -> base.Stream:
    """Class-incremental stream from a prepared tfds dataset; config fields in the docstring."""
    name = cfg.get("tfds_name", None)
    if not name:
        raise ValueError(
            f"tfds_seg: config.tfds_name is empty; give a prepared tfds dataset "
            f"(presets: {sorted(PRESETS)})"
        )
    preset_name = str(cfg.get("preset", None) or name)
    if cfg.get("preset", None) and preset_name not in PRESETS:
        raise ValueError(f"tfds_seg: unknown preset {preset_name!r}; valid: {sorted(PRESETS)}")
    preset = PRESETS.get(preset_name, {})
    get = lambda key: _setting(cfg, preset, key)
    names = get("class_names")
    if not names:
        raise ValueError(
            f"tfds_seg: config.class_names is empty for {name!r} (no preset); give one name per "
            f"class, background first"
        )
    names = tuple(str(n) for n in names)
    data_dir = cfg.get("data_dir", None) or None
    if data_dir:
        data_dir = os.path.expanduser(str(data_dir))
    size = int(cfg.get("image_size", 512) or 512)
    train_lut = _lut(get("label_map"), "tfds_seg: config.label_map")
    test_lut = _lut(get("test_label_map"), "tfds_seg: config.test_label_map")
    if test_lut is None:
        test_lut = train_lut
    elif train_lut is not None:
        test_lut = test_lut[train_lut]  # the test map applies after the training one
    sources = [
        TfdsSource(
            str(name),
            str(get(split_key)),
            data_dir,
            str(get("image_key")),
            str(get("label_key")),
            size,
            label_map=lut,
            num_classes=len(names),
            fg_class_key=get("fg_class_key"),
            label_channel=int(get("label_channel")),
        )
        for split_key, lut in (("train_split", train_lut), ("test_split", test_lut))
    ]
    cache = cfg.get("cache_dir", None)
    return incremental.make_stream(
        f"tfds_seg/{name}",
        sources[0],
        sources[1],
        files.presence(sources[0], len(names), cache_dir=cache),
        files.presence(sources[1], len(names), cache_dir=cache),
        names,
        str(cfg.get("protocol", None) or get("protocol")),
        str(cfg.get("setting", None) or "overlapped"),
    )
