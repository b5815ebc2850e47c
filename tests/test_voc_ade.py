"""VOC / ADE20K folder builders on tiny generated folders; file sources; the scale augmentation."""

from __future__ import annotations

import os
import shutil

import ml_collections
import numpy as np
import pytest
from PIL import Image

from clseg_jax.data import ade, base, files, loader, tiny_layouts, voc

SIZE = 32


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    return tiny_layouts.write_voc(root, n_train=24, n_val=12, size=SIZE, borders=True, aug=True)


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    return tiny_layouts.write_ade(tmp_path_factory.mktemp("ade"), n_train=24, n_val=12, size=SIZE)


def _cfg(root, tmp_path, **kw) -> ml_collections.ConfigDict:
    cfg = {
        "root": str(root),
        "protocol": "2-2",
        "setting": "overlapped",
        "image_size": 40,
        "class_names": tiny_layouts.class_names(4),
        "cache_dir": str(tmp_path / "cache"),
    }
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def _mask_classes(paths) -> list[set[int]]:
    """Classes of each mask, read here with PIL directly (palette index = class id)."""
    return [set(np.unique(np.array(Image.open(p))).tolist()) - {255} for p in paths]


def _split_ids(root, split):
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def test_voc_stream_matches_the_masks(voc_root, tmp_path):
    train = _mask_classes(
        voc_root / "SegmentationClass" / f"{i}.png" for i in _split_ids(voc_root, "train")
    )
    val = _mask_classes(
        voc_root / "SegmentationClass" / f"{i}.png" for i in _split_ids(voc_root, "val")
    )
    counts = {}
    for setting in ("overlapped", "disjoint", "sequential"):
        s = voc.make(_cfg(voc_root, tmp_path, setting=setting, masks="SegmentationClass"))
        assert s.name == "voc" and s.num_classes == 5 and len(s.test) == len(val) == 12
        step_sets = ({1, 2}, {3, 4})
        for t, (exp, step) in enumerate(zip(s.experiences, step_sets, strict=True)):
            seen = set().union({0}, *step_sets[: t + 1])
            expected = [
                i
                for i, c in enumerate(train)
                if c & step and (setting == "overlapped" or c <= seen)
            ]
            assert exp.train.indices.tolist() == expected
            assert exp.test.indices.tolist() == [i for i, c in enumerate(val) if c & step]
            assert exp.classes == (
                (0, *sorted(step)) if setting != "sequential" or t == 0 else (0, 1, 2, 3, 4)
            )
        counts[setting] = [len(e.train) for e in s.experiences]
    # The tiny layout mixes classes of both steps in some images: the settings differ.
    assert counts["overlapped"][0] > counts["disjoint"][0] == counts["sequential"][0] > 0


def test_canvas_pads_and_keeps_labels(voc_root, tmp_path):
    ids = _split_ids(voc_root, "train")
    src = voc.split_source(voc_root, "train", 40, 5, "SegmentationClass")
    shapes_seen = set()
    for i in range(6):
        x = src[i]
        mask = np.array(Image.open(voc_root / "SegmentationClass" / f"{ids[i]}.png"))
        image = np.array(Image.open(voc_root / "JPEGImages" / f"{ids[i]}.jpg").convert("RGB"))
        h, w = mask.shape
        shapes_seen.add((h, w))
        assert x["image"].shape == (40, 40, 3) and x["label"].shape == (40, 40)
        np.testing.assert_array_equal(x["label"][:h, :w], mask)
        np.testing.assert_array_equal(x["image"][:h, :w], image)
        assert (x["label"][h:] == 255).all() and (x["label"][:, w:] == 255).all()
        assert (x["image"][h:] == 0).all() and (x["image"][:, w:] == 0).all()
    assert len(shapes_seen) > 1  # square and non-square images both occur
    # A canvas smaller than the image: longer side downscaled to it, labels stay class ids.
    small = voc.split_source(voc_root, "train", 16, 5, "SegmentationClass")[0]["label"]
    assert small.shape == (16, 16)
    assert set(np.unique(small).tolist()) <= set(np.unique(src[0]["label"]).tolist())


def test_resize_crop_is_mibs_resize_then_center_crop():
    # Rows hold their row index, columns their column index: sampled positions are readable.
    h, w, size = 20, 28, 10
    rows = np.repeat(np.arange(h, dtype=np.uint8)[:, None], w, axis=1)
    cols = np.repeat(np.arange(w, dtype=np.uint8)[None, :], h, axis=0)
    image = np.stack([rows, cols, rows], -1)
    out_rows = files.resize_crop(image, rows, size)["label"]
    out_cols = files.resize_crop(image, cols, size)["label"]
    # Shorter side 20 -> 10 (factor 2), longer 28 -> int(10 * 28 / 20) = 14; the centred
    # 10-px window starts at column round((14 - 10) / 2) = 2. Nearest sampling takes source
    # pixel 2k + 1 for output pixel k.
    assert out_rows.shape == out_cols.shape == (size, size)
    np.testing.assert_array_equal(out_rows[:, 0], 2 * np.arange(size) + 1)
    np.testing.assert_array_equal(out_cols[0], 2 * (np.arange(size) + 2) + 1)


def test_test_fit_option(voc_root, tmp_path):
    s = voc.make(_cfg(voc_root, tmp_path, image_size=16, test_fit="resize_crop"))
    # The test split goes through resize_crop (tested above), training keeps the padded canvas.
    mask = np.array(Image.open(s.test.label_paths[0]))
    image = np.array(Image.open(s.test.image_paths[0]).convert("RGB"))
    np.testing.assert_array_equal(s.test[0]["label"], files.resize_crop(image, mask, 16)["label"])
    assert "resize_crop" in repr(s.test) and "resize_crop" not in repr(s.experiences[0].train)
    with pytest.raises(ValueError, match=r"fit 'stretch' unknown"):
        voc.make(_cfg(voc_root, tmp_path, test_fit="stretch"))


def test_palette_and_grayscale_masks_give_the_same_ids(voc_root):
    pal = voc.split_source(voc_root, "val", SIZE, 5, "SegmentationClass")
    gray = voc.split_source(voc_root, "val", SIZE, 5, "SegmentationClassAug")
    assert (
        Image.open(pal.label_paths[0]).mode == "P" and Image.open(gray.label_paths[0]).mode == "L"
    )
    for i in range(len(pal)):
        np.testing.assert_array_equal(pal.label(i), gray.label(i))
    # "auto" prefers the augmented masks when they exist.
    assert "SegmentationClassAug" in voc.split_source(voc_root, "val", SIZE, 5).label_paths[0]


def test_deeplab_style_list_file(voc_root, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(voc_root, root)
    ids = _split_ids(root, "train")[:10]
    (root / "list").mkdir()
    (root / "list" / "train_aug.txt").write_text(
        "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids)
    )
    (root / "ImageSets" / "Segmentation" / "trainaug.txt").unlink()
    src = voc.split_source(root, "trainaug", SIZE, 5)
    assert len(src) == 10 and src.image_paths[0].endswith(f"{ids[0]}.jpg")
    # Without any augmented list (VOC2012 without SBD): the plain train list, with a warning.
    (root / "list" / "train_aug.txt").unlink()
    train = _split_ids(root, "train")
    src = voc.split_source(root, "trainaug", SIZE, 5)
    assert len(src) == len(train) and src.image_paths[0].endswith(f"{train[0]}.jpg")


def test_voc_errors(voc_root, tmp_path):
    with pytest.raises(ValueError, match=r"does not exist.*config.root"):
        voc.make(_cfg(tmp_path / "nowhere", tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"JPEGImages.*does not exist"):
        voc.make(_cfg(tmp_path / "empty", tmp_path))
    with pytest.raises(ValueError, match=r"split 'trainval' not found.*ImageSets/Segmentation"):
        voc.make(_cfg(voc_root, tmp_path, train_split="trainval"))
    with pytest.raises(ValueError, match=r"protocol '3-2'"):
        voc.make(_cfg(voc_root, tmp_path, protocol="3-2"))
    with pytest.raises(ValueError, match=r"unknown incremental setting 'mixed'"):
        voc.make(_cfg(voc_root, tmp_path, setting="mixed"))
    with pytest.raises(ValueError, match=r"config\.masks"):
        voc.make(_cfg(voc_root, tmp_path, masks="Masks"))
    # Three class names for a four-class folder: label 4 is outside the class set.
    with pytest.raises(ValueError, match=r"\.png: labels \[4\] outside the class set 0\.\.3"):
        voc.make(_cfg(voc_root, tmp_path, class_names=tiny_layouts.class_names(3), protocol="2-1"))
    root = tmp_path / "missing"
    shutil.copytree(voc_root, root)
    first = _split_ids(root, "val")[0]
    (root / "JPEGImages" / f"{first}.jpg").unlink()
    with pytest.raises(ValueError, match=f"image .*{first}.jpg' is listed in split 'val'"):
        voc.make(_cfg(root, tmp_path))


def test_file_source_errors(voc_root, tmp_path):
    jpg = str(next((voc_root / "JPEGImages").iterdir()))
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (SIZE, SIZE)).save(rgb)
    with pytest.raises(ValueError, match=r"mode 'RGB'.*palette"):
        files.SegFileSource([jpg], [rgb], SIZE, "t")[0]
    wrong = tmp_path / "wrong.png"
    Image.new("L", (SIZE + 1, SIZE)).save(wrong)
    with pytest.raises(ValueError, match=r"mask .*wrong.png is \[32, 33\] but image"):
        files.SegFileSource([jpg], [wrong], SIZE, "t")[0]
    with pytest.raises(ValueError, match=r"mask cannot be read"):
        files.SegFileSource([jpg], [tmp_path / "none.png"], SIZE, "t")[0]
    assert "0x" not in repr(files.SegFileSource([jpg], [wrong], SIZE, "t"))


def test_presence_cache_hit_and_invalidation(voc_root, tmp_path, monkeypatch):
    root = tmp_path / "voc"
    shutil.copytree(voc_root, root)
    src = voc.split_source(root, "val", SIZE, 5, "SegmentationClass")
    cache = tmp_path / "cache"
    first = files.presence(src, 5, cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == 1
    real_read = files.read_mask
    reads = []
    monkeypatch.setattr(files, "read_mask", lambda *a: reads.append(a) or real_read(*a))
    np.testing.assert_array_equal(files.presence(src, 5, cache_dir=cache), first)
    assert reads == []  # served from the cache
    # An edited mask (new modification time) is read again.
    path = src.label_paths[0]
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    np.testing.assert_array_equal(files.presence(src, 5, cache_dir=cache), first)
    assert len(reads) == len(src)
    # Mask paths work as well as a source, with the same answer.
    np.testing.assert_array_equal(files.presence(list(src.label_paths), 5, cache_dir=cache), first)


def test_ade_builder(ade_root, tmp_path):
    names = tiny_layouts.class_names(4, background="other")
    base_cfg = dict(protocol="2-1-1", class_names=names, image_size=SIZE)
    # config.root may be the ADEChallengeData2016 folder or its parent.
    s = ade.make(_cfg(ade_root.parent, tmp_path, **base_cfg))
    assert [e.classes for e in s.experiences] == [(0, 1, 2), (0, 3), (0, 4)]
    assert len(s.test) == 12 and len(s.experiences[0].train) > 0
    masks = sorted((ade_root / "annotations" / "validation").glob("*.png"))
    raw = np.array(Image.open(masks[0]))
    # Test split: "other" (0) is ignored by default, and kept as class 0 on request.
    got = s.test[0]["label"][: raw.shape[0], : raw.shape[1]]
    np.testing.assert_array_equal(got, np.where(raw == 0, 255, raw))
    kept = ade.make(_cfg(ade_root, tmp_path, test_other="background", **base_cfg))
    np.testing.assert_array_equal(kept.test[0]["label"][: raw.shape[0], : raw.shape[1]], raw)
    # Training keeps 0 as background.
    assert 0 in s.experiences[0].train[0]["label"]
    with pytest.raises(ValueError, match=r"config\.test_other"):
        ade.make(_cfg(ade_root, tmp_path, test_other="drop", **base_cfg))


def test_ade_errors(ade_root, tmp_path):
    names = tiny_layouts.class_names(4, background="other")
    with pytest.raises(
        ValueError, match=r"images/training' does not exist; expected ADEChallengeData2016"
    ):
        ade.make(_cfg(tmp_path, tmp_path, class_names=names))
    root = tmp_path / "ade"
    shutil.copytree(ade_root, root)
    first = sorted((root / "annotations" / "training").glob("*.png"))[0]
    first.unlink()
    with pytest.raises(ValueError, match=f"annotation .*{first.name}' of image"):
        ade.make(_cfg(root, tmp_path, class_names=names, protocol="2-2"))
    # The 150-class default protocol does not fit 4 classes.
    with pytest.raises(ValueError, match=r"protocol '100-50'"):
        ade.make(_cfg(ade_root, tmp_path, class_names=names, protocol="100-50"))
    assert len(ade.CLASS_NAMES) == 151 and len(voc.CLASS_NAMES) == 21


def test_tiny_layouts_are_deterministic(tmp_path):
    a = tiny_layouts.write_voc(tmp_path / "a", n_train=6, n_val=3, size=24, seed=3)
    b = tiny_layouts.write_voc(tmp_path / "b", n_train=6, n_val=3, size=24, seed=3)
    c = tiny_layouts.write_voc(tmp_path / "c", n_train=6, n_val=3, size=24, seed=4)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.*"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.*"))
    same = [(a / f).read_bytes() == (b / f).read_bytes() for f in files_a]
    other = [(a / f).read_bytes() == (c / f).read_bytes() for f in files_a if f.suffix == ".png"]
    assert all(same) and not all(other)
    with pytest.raises(ValueError, match=r"1\.\.4 foreground classes"):
        tiny_layouts.write_voc(tmp_path / "d", num_classes=5)


# --------------------------------------------------------------------------- scale augmentation


def _augment(image, label, *, crop, scale, seed=0, flip=False):
    aug = loader.Augment(np.ones(256, bool), crop, flip, scale)
    return aug.random_map({"image": image, "label": label}, np.random.default_rng(seed))


def test_scale_augmentation_shapes_values_and_padding():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, (16, 16)).astype(np.uint8)
    image = np.full((16, 16, 3), 200, np.uint8)
    for seed in range(20):
        out = _augment(image, label, crop=12, scale=(0.5, 2.0), seed=seed, flip=True)
        assert out["image"].shape == (12, 12, 3) and out["label"].shape == (12, 12)
        # Nearest-neighbour scaling adds no label value; padding adds only 255.
        assert set(np.unique(out["label"]).tolist()) <= set(np.unique(label).tolist()) | {255}
    # Scale 0.5 of 16 px is 8 px: a 16-px crop is the scaled image padded bottom/right.
    out = _augment(image, label, crop=16, scale=(0.5, 0.5))
    assert (out["label"][:8, :8] != 255).all()
    assert (out["label"][8:] == 255).all() and (out["label"][:, 8:] == 255).all()
    assert (out["image"][8:] == 0).all() and (out["image"][:, 8:] == 0).all()
    assert (out["image"][:8, :8] == 200).all()
    # Scale 2 with a full-size crop: every pixel is an upsampled label, no padding.
    out = _augment(image, label, crop=None, scale=(2.0, 2.0))
    assert out["label"].shape == (16, 16) and 255 not in out["label"]
    # Without scale the old behaviour stays: an image smaller than the crop is not padded.
    assert _augment(image, label, crop=20, scale=None)["label"].shape == (16, 16)


def test_scale_augmentation_in_the_pipeline(voc_root, tmp_path):
    s = voc.make(_cfg(voc_root, tmp_path, image_size=SIZE))
    exp = s.experiences[0]
    visible = s.class_mask(exp.classes)
    ds = loader.train_dataset(
        exp.train, visible, global_batch=4, epochs=1, seed=0, crop=24, flip=True, scale=(0.5, 2.0)
    )
    for batch in ds:
        assert batch["image"].shape == (4, 24, 24, 3) and batch["label"].shape == (4, 24, 24)
        assert set(np.unique(batch["label"]).tolist()) <= {0, 1, 2, base.IGNORE}
    with pytest.raises(ValueError, match=r"scale must be"):
        loader.train_dataset(exp.train, visible, global_batch=4, epochs=1, seed=0, scale=(2, 1))


def test_tiny_stream_builders_write_once(tmp_path, monkeypatch):
    cfg = ml_collections.ConfigDict(
        {
            "root": str(tmp_path / "tiny"),
            "n_train": 12,
            "n_val": 6,
            "image_size": 24,
            "protocol": "2-2",
            "setting": "disjoint",
            "cache_dir": str(tmp_path / "cache"),
        }
    )
    s = tiny_layouts.make_voc(cfg)
    assert s.class_names == tiny_layouts.class_names(4) and len(s.test) == 6
    assert s.experiences[1].classes == (0, 3, 4) and s.test[0]["image"].shape == (24, 24, 3)
    # Second build: the folder is reused, nothing is written.
    monkeypatch.setattr(tiny_layouts, "write_voc", lambda *a, **k: pytest.fail("written again"))
    assert len(tiny_layouts.make_voc(cfg).test) == 6
    a = tiny_layouts.make_ade(cfg)
    assert a.class_names[0] == "other" and 0 not in a.test[0]["label"]
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == [
        "ade-k4-n12-6-s24-seed0",
        "voc-k4-n12-6-s24-seed0",
    ]


# --------------------------------------------------------------------------- any root


def test_class_names_from_config_labels_file_or_the_default(tmp_path):
    root = tiny_layouts.write_voc(tmp_path / "voc3", num_classes=3, n_train=12, n_val=6, size=24)
    written = tiny_layouts.class_names(3)
    assert (root / files.LABELS_FILE).read_text().split() == list(written)
    cfg = _cfg(root, tmp_path, protocol="2-1", image_size=24, class_names=())
    stream = voc.make(cfg)  # names and count from labels.txt
    assert stream.class_names == written and stream.num_classes == 4
    cfg.class_names = ("bg", "a", "b", "c")
    assert voc.make(cfg).class_names == ("bg", "a", "b", "c")  # the config's win
    (root / files.LABELS_FILE).unlink()
    cfg.class_names = ()
    # No file, no field: VOC's 21 classes, which this 4-class root's protocol does not fit.
    with pytest.raises(ValueError, match="2-1"):
        voc.make(cfg)
    (root / files.LABELS_FILE).write_text("background\nsquare\nsquare\n")
    with pytest.raises(ValueError, match="each once"):
        voc.make(cfg)
    # ADE20K's layout with 2 classes, named by its labels.txt (given the folder's parent).
    ade_root = tiny_layouts.write_ade(tmp_path / "ade2", num_classes=2, n_train=8, n_val=4, size=24)
    cfg = _cfg(ade_root.parent, tmp_path, protocol="1-1", image_size=24, class_names=())
    stream = ade.make(cfg)
    assert stream.class_names == tiny_layouts.class_names(2, "other") and stream.num_classes == 3
    assert [e.classes for e in stream.experiences] == [(0, 1), (0, 2)]
    with pytest.raises(ValueError, match=r"protocol '2-1'"):
        ade.make(_cfg(ade_root, tmp_path, protocol="2-1", image_size=24, class_names=()))


def test_voc_config_on_any_root_with_the_small_recipe(tmp_path):
    """configs/voc_ci.py with root= (no tiny, no wrapper config): the class count from the
    root's labels.txt, the small recipe's model and optimizer, one short run end to end; and
    the paper recipe with model=unet builds (it passed DeepLab's output_stride to the UNet)."""
    from clseg_jax import main, setup, train
    from configs import voc_ci

    root = tiny_layouts.write_voc(tmp_path / "voc3", num_classes=3, n_train=48, n_val=12, size=32)
    arg = f"root={root},recipe=small,task=2-1,method=mib,size=32,epochs=1"
    cfg = voc_ci.get_config(arg)
    assert (cfg.model.name, cfg.optimizer.name, cfg.strategy.mib_kd) == ("unet", "adam", 10.0)
    main.check_args(
        ["main", f"--config=configs/voc_ci.py:{arg}", "--config.data.class_names=('a','b')"]
    )
    cfg.data.train_split = "train"
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.progress, cfg.log.tensorboard = False, False
    r = train.run(cfg, str(tmp_path / "run"))
    assert r["stream"]["num_classes"] == 4 and len(r["accuracy_matrix"]) == 2
    assert r["forgetting_on"] == "old classes' IoU on the full test set"
    for model in ("unet", "bisenet_small"):
        paper = voc_ci.get_config(f"root={root},task=2-1,method=mib,size=32,batch=8,model={model}")
        paper.data.train_split, paper.data.cache_dir = "train", str(tmp_path / "cache")
        assert paper.optimizer.name == "sgd" and "output_stride" not in paper.model.kwargs
        setup.build(paper)
    with pytest.raises(ValueError, match="unknown recipe 'fast'"):
        voc_ci.get_config("recipe=fast")
