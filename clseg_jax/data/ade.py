"""Class-incremental ADE20K (SceneParsing, 150 classes) from a folder (MiB / PLOP protocols).

Layout (the ``ADEChallengeData2016.zip`` one; ``config.root`` may be that folder or its parent)::

    ADEChallengeData2016/images/{training,validation}/ADE_*.jpg
    ADEChallengeData2016/annotations/{training,validation}/ADE_*.png   grayscale, 0..150

Classes: 0 = "other" (pixels of none of the 150 classes) and 1..150 in the benchmark's order,
so mask values are class ids. Protocols: ``100-50``, ``100-10``, ``50-50``, ``100-5``
(``data/protocols.py``), settings as in ``data/incremental.py`` (the ADE papers use
``overlapped``).

Value 0, following the official code of the papers:

* training: background. MiB (``dataset/ade.py``) and PLOP both map 0 to the background index in
  training, so "other" pixels train the background class like unlabelled ones.
* test: ``config.test_other = "ignore"`` (default) maps 0 to 255, as MiB's official test set does
  and as the ADE20K benchmark scores 150 classes; ``"background"`` keeps it as class 0, PLOP's
  default (PLOP's ``--ignore_test_bg`` gives MiB's choice). With "ignore" no test pixel is
  background, so the background IoU is undefined: report mIoU over classes 1..150.

Config fields (``make``): ``root`` (required), ``protocol`` ("100-50"), ``setting``
("overlapped"), ``image_size`` (512: the canvas, see ``files.fit_canvas``; ADE images larger
than that are downscaled to longer side 512), ``test_fit`` ("pad"; "resize_crop": shorter side
512 and a centred square, MiB's reference-code default ``--crop_val``), ``train_split``
("training"), ``test_split`` ("validation"), ``test_other`` ("ignore"), ``class_names``
(overrides the 151 names, e.g. for ``tiny_layouts.write_ade``), ``cache_dir``.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from clseg_jax.data import base, checks, files, incremental

CLASS_NAMES = (
    "other",
    *(
        "wall, building, sky, floor, tree, ceiling, road, bed, windowpane, grass, cabinet, "
        "sidewalk, person, earth, door, table, mountain, plant, curtain, chair, car, water, "
        "painting, sofa, shelf, house, sea, mirror, rug, field, armchair, seat, fence, desk, "
        "rock, wardrobe, lamp, bathtub, railing, cushion, base, box, column, signboard, "
        "chest of drawers, counter, sand, sink, skyscraper, fireplace, refrigerator, grandstand, "
        "path, stairs, runway, case, pool table, pillow, screen door, stairway, river, bridge, "
        "bookcase, blind, coffee table, toilet, flower, book, hill, bench, countertop, stove, "
        "palm, kitchen island, computer, swivel chair, boat, bar, arcade machine, hovel, bus, "
        "towel, light, truck, tower, chandelier, awning, streetlight, booth, "
        "television receiver, airplane, dirt track, apparel, pole, land, bannister, escalator, "
        "ottoman, bottle, buffet, poster, stage, van, ship, fountain, conveyer belt, canopy, "
        "washer, plaything, swimming pool, stool, barrel, basket, waterfall, tent, bag, "
        "minibike, cradle, oven, ball, food, step, tank, trade name, microwave, pot, animal, "
        "bicycle, lake, dishwasher, screen, blanket, sculpture, hood, sconce, vase, "
        "traffic light, tray, ashcan, fan, pier, crt screen, plate, monitor, bulletin board, "
        "shower, radiator, glass, clock, flag"
    ).split(", "),
)
TEST_OTHER = ("ignore", "background")
_LAYOUT = "ADEChallengeData2016/images/<split>/*.jpg and annotations/<split>/*.png"


def _ade_root(root: Path) -> Path:
    nested = root / "ADEChallengeData2016"
    return nested if nested.is_dir() else root


def split_source(
    root: Path, split: str, size: int, num_classes: int, label_map=None, fit: str = "pad"
) -> files.SegFileSource:
    """One ADE20K split (sorted by file name) as a lazy source with full labels."""
    images_dir, masks_dir = root / "images" / split, root / "annotations" / split
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise ValueError(f"ade: folder {str(folder)!r} does not exist; expected {_LAYOUT}")
    images = sorted(images_dir.glob("*.jpg"))
    if not images:
        raise ValueError(f"ade: folder {str(images_dir)!r} holds no .jpg images")
    labels = [masks_dir / f"{p.stem}.png" for p in images]
    checks.files_exist(
        labels,
        lambda p: (
            f"ade: annotation {str(p)!r} of image {images[labels.index(p)].name} does not exist"
        ),
    )
    return files.SegFileSource(
        images,
        labels,
        size,
        f"ade/{split}",
        label_map=label_map,
        num_classes=num_classes,
        fit=fit,
    )


def make(cfg: ml_collections.ConfigDict) -> base.Stream:
    """Class-incremental ADE20K stream; config fields in the module docstring."""
    root = _ade_root(files.dataset_root(cfg, "ade", f"a folder with {_LAYOUT}"))
    names = files.class_names(cfg, root, CLASS_NAMES, "ade")
    size = int(cfg.get("image_size", 512) or 512)
    other = str(cfg.get("test_other", "ignore") or "ignore")
    if other not in TEST_OTHER:
        raise ValueError(f"ade: config.test_other = {other!r}; valid: {list(TEST_OTHER)}")
    test_map = files.lut_from_pairs({0: base.IGNORE}) if other == "ignore" else None
    train = split_source(
        root, str(cfg.get("train_split", "training") or "training"), size, len(names)
    )
    test = split_source(
        root,
        str(cfg.get("test_split", "validation") or "validation"),
        size,
        len(names),
        test_map,
        str(cfg.get("test_fit", "pad") or "pad"),
    )
    cache = cfg.get("cache_dir", None)
    return incremental.make_stream(
        "ade",
        train,
        test,
        files.presence(train, len(names), cache_dir=cache),
        files.presence(test, len(names), cache_dir=cache),
        names,
        str(cfg.get("protocol", "100-50")),
        str(cfg.get("setting", "overlapped")),
    )
