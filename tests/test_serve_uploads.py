"""Uploads of one experience (clseg_jax.serve.uploads): zip/npz parsing and every rejection."""

from __future__ import annotations

import io
import stat
import struct
import time
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from clseg_jax.serve.uploads import Limits, UploadError, parse_upload, summary, to_npz_bytes

H, W, K = 4, 6, 3


def png(arr: np.ndarray, palette: bool = False) -> bytes:
    im = Image.fromarray(arr)
    if palette:  # index i shown as an unrelated colour: the index, not the colour, is the class
        im.putpalette([v for i in range(256) for v in (200 - i % 50, 7 * i % 256, 13)])
        assert im.mode == "P"
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def make_zip(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def sample(prefix: str = "") -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """A valid upload: train a (RGB, P mask), b (grayscale, L mask); test c (JPEG, L mask)."""
    rng = np.random.default_rng(0)
    xa = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    xb = rng.integers(0, 256, (H, W), dtype=np.uint8)
    xc = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    ya = rng.choice(np.array([0, 1, 2, 255], np.uint8), (H, W))
    yb = rng.integers(0, K, (H, W), dtype=np.uint8)
    yc = rng.integers(0, K, (H, W), dtype=np.uint8)
    c_bytes = jpeg(xc)
    entries = {  # b before a: rows must come out sorted by name
        f"{prefix}train/images/b.png": png(xb),
        f"{prefix}train/masks/b.png": png(yb),
        f"{prefix}train/images/a.png": png(xa),
        f"{prefix}train/masks/a.png": png(ya, palette=True),
        f"{prefix}test/images/c.JPG": c_bytes,
        f"{prefix}test/masks/c.png": png(yc),
    }
    expected = {
        "x_train": np.stack([xa, np.repeat(xb[..., None], 3, -1)]),
        "y_train": np.stack([ya, yb]),
        "x_test": np.asarray(Image.open(io.BytesIO(c_bytes)).convert("RGB"))[None],
        "y_test": yc[None],
    }
    return entries, expected


def rejects(data: bytes, *needles: str, filename: str = "up.zip", **kw) -> str:
    with pytest.raises(UploadError) as err:
        parse_upload(data, filename, K, **kw)
    msg = str(err.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def central(data: bytes, name: str) -> int:
    """Offset of ``name``'s central-directory header in a zip."""
    pos = data.find(b"PK\x01\x02")
    while pos >= 0:
        n = struct.unpack_from("<H", data, pos + 28)[0]
        if data[pos + 46 : pos + 46 + n] == name.encode():
            return pos
        pos = data.find(b"PK\x01\x02", pos + 4)
    raise KeyError(name)


def png_header(width: int, height: int) -> bytes:
    """A PNG that only claims a size: IHDR, an empty IDAT, IEND."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + (chunk(b"IEND", b""))
    )


@pytest.mark.parametrize("prefix", ["", "my data/"])
def test_valid_zip(prefix):
    entries, expected = sample(prefix)
    entries = {
        f"{prefix}train/": b"",  # directory entry
        **entries,
        "__MACOSX/train/images/._a.png": b"\0junk",
        f"{prefix}.DS_Store": b"junk",
        f"{prefix}train/masks/.DS_Store": b"junk",
    }
    out = parse_upload(make_zip(entries), "Up.ZIP", K)
    assert list(out) == ["x_train", "y_train", "x_test", "y_test"]
    for a, want in expected.items():
        assert out[a].dtype == np.uint8 and out[a].shape == want.shape, a
        np.testing.assert_array_equal(out[a], want, err_msg=a)
    assert (out["y_train"] == 255).any()  # ignore survives
    want = {"n_train": 2, "n_test": 1, "height": H, "width": W, "classes": [0, 1, 2]}
    assert summary(out) == {**want, "max_label": 2, "labels": "masks"}
    # The lineage's size is accepted; stored (uncompressed) members too.
    parse_upload(make_zip(sample()[0], zipfile.ZIP_STORED), "u.zip", K, image_size=(H, W))


def test_npz_round_trip_and_checks():
    _, arrays = sample()
    wide = {**arrays, "y_train": arrays["y_train"].astype(np.int64)}
    buf = io.BytesIO()
    np.savez_compressed(buf, **wide)
    for data in (buf.getvalue(), to_npz_bytes(wide)):
        out = parse_upload(data, "e.npz", K)
        for a, want in arrays.items():
            assert out[a].dtype == np.uint8
            np.testing.assert_array_equal(out[a], want)
    parse_upload(to_npz_bytes(arrays), "e.npz", K, image_size=(H, W))
    rejects(
        to_npz_bytes(arrays), "x_train images are 4x6", "8x8", filename="e.npz", image_size=(8, 8)
    )

    def npz(**change) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **{**arrays, **change})  # np.savez pickles object arrays
        return buf.getvalue()

    rejects(npz(x_train=np.array([None, 1], dtype=object)), "x_train", "pickle", filename="e.npz")
    rejects(
        npz(x_test=arrays["x_test"].astype(np.float32)),
        "x_test must be uint8",
        "float32",
        filename="e.npz",
    )
    rejects(npz(y_test=arrays["y_test"].astype(np.float32)), "integer dtype", filename="e.npz")
    rejects(npz(y_train=arrays["y_train"][:, :2]), "y_train must be [N,H,W]", filename="e.npz")
    rejects(npz(y_test=np.full((1, H, W), -1)), "negative", filename="e.npz")
    rejects(npz(y_train=np.full((2, H, W), 9)), "y_train", "label 9", filename="e.npz")
    rejects(
        npz(x_test=arrays["x_test"][:0], y_test=arrays["y_test"][:0]),
        "x_test has 0 images",
        filename="e.npz",
    )
    rejects(
        npz(x_test=arrays["x_test"][:, :2], y_test=arrays["y_test"][:, :2]),
        "x_test images are 2x6",
        filename="e.npz",
    )
    missing = io.BytesIO()
    np.savez(missing, x_train=arrays["x_train"])
    rejects(missing.getvalue(), "missing array 'y_train'", filename="e.npz")
    rejects(b"not a zip", "not a valid zip", filename="e.npz")
    rejects(to_npz_bytes(arrays), "declares", filename="e.npz", limits=Limits(max_uncompressed=50))


def test_npz_header_claiming_huge_array():
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (10**6, 10**6, 3)}
    )
    _, arrays = sample()
    entries = {f"{a}.npy": io.BytesIO() for a in arrays}
    for a, f in entries.items():
        np.lib.format.write_array(f, arrays[a[:-4]])
    data = make_zip(
        {
            **{a: f.getvalue() for a, f in entries.items()},
            "x_train.npy": header.getvalue() + b"\0" * 16,
        }
    )
    rejects(data, "x_train header claims shape", filename="e.npz")


def test_to_npz_bytes_is_deterministic(monkeypatch):
    _, arrays = sample()
    first = to_npz_bytes(arrays)
    later = time.time() + 3 * 3600  # zip timestamps would differ
    monkeypatch.setattr(time, "time", lambda: later)
    copy = {a: np.asfortranarray(arrays[a].copy()) for a in reversed(list(arrays))}
    assert to_npz_bytes(copy) == first
    assert to_npz_bytes({**arrays, "y_test": arrays["y_test"] + 1}) != first
    with np.load(io.BytesIO(first)) as z:
        np.testing.assert_array_equal(z["x_train"], arrays["x_train"])


@pytest.mark.parametrize(
    ("name", "needles"),
    [
        ("../x.png", ("../x.png", "traversal")),
        ("train/images/../../x.png", ("traversal",)),
        ("/train/images/a.png", ("absolute path",)),
        ("train\\images\\a.png", ("backslash",)),
        ("C:/train/images/a.png", ("drive letter",)),
    ],
)
def test_unsafe_paths(name, needles):
    entries, _ = sample()
    rejects(make_zip({**entries, name: b"x"}), *needles)


def test_symlink_and_encrypted_members():
    entries, _ = sample()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        link = zipfile.ZipInfo("train/images/d.png")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    rejects(buf.getvalue(), "train/images/d.png", "symlink")

    data = bytearray(make_zip(entries))
    pos = central(bytes(data), "train/masks/a.png")
    data[pos + 8] |= 0x1  # general-purpose flag bit 0: encrypted
    rejects(bytes(data), "train/masks/a.png is encrypted; upload an unencrypted zip")


def test_zip_bombs_and_limits():
    entries, _ = sample()
    bomb = make_zip({**entries, "train/images/z.png": bytes(8 * 2**20)})
    assert len(bomb) < 2**17
    rejects(bomb, "train/images/z.png", "zip bomb")
    rejects(
        make_zip(entries), "declares", "over the limit of 100", limits=Limits(max_uncompressed=100)
    )
    rejects(make_zip(entries), "more than 5 entries", limits=Limits(max_files=5))
    rejects(make_zip(entries), "over 100", limits=Limits(max_bytes=100))
    rejects(make_zip(entries), "train has 2 images, over 1", limits=Limits(max_images=1))
    rejects(b"PK\x03\x04 garbage", "not a valid zip archive")

    # A member whose header says fewer bytes than it holds: never read past the declared size.
    data = bytearray(make_zip(entries, zipfile.ZIP_STORED))
    pos = central(bytes(data), "train/images/a.png")
    size = struct.unpack_from("<I", data, pos + 24)[0]
    struct.pack_into("<I", data, pos + 24, size // 2)
    struct.pack_into("<I", data, struct.unpack_from("<I", data, pos + 42)[0] + 22, size // 2)
    rejects(bytes(data), "train/images/a.png", "does not match its header")


def test_image_pixel_limits():
    entries, _ = sample()
    wide = png_header(2**25, 1)  # 33M pixels: over our cap, under PIL's own bomb threshold
    rejects(make_zip({**entries, "train/images/a.png": wide}), "train/images/a.png", "too large")
    huge = png_header(10**5, 10**5)  # PIL's DecompressionBombError
    rejects(make_zip({**entries, "train/images/a.png": huge}), "train/images/a.png", "too large")
    rejects(make_zip(entries), "too large", "over 10", limits=Limits(max_image_pixels=10))


def test_bad_images_and_masks():
    entries, _ = sample()
    a_png = entries["train/images/a.png"]
    rejects(
        make_zip({**entries, "train/images/a.png": a_png[: len(a_png) // 2]}),
        "train/images/a.png",
        "corrupt or truncated",
    )
    rejects(
        make_zip({**entries, "train/images/a.png": b"GIF89a" + bytes(40)}),
        "train/images/a.png",
        "not a PNG or JPEG",
    )
    gif = io.BytesIO()
    Image.new("P", (W, H)).save(gif, "GIF")
    rejects(make_zip({**entries, "train/images/a.png": gif.getvalue()}), "not a PNG or JPEG")
    rejects(
        make_zip({**entries, "train/masks/a.png": jpeg(np.zeros((H, W, 3), np.uint8))}),
        "train/masks/a.png",
        "not a PNG image",
    )
    rgb_mask = png(np.zeros((H, W, 3), np.uint8))
    rejects(
        make_zip({**entries, "train/masks/a.png": rgb_mask}),
        "train/masks/a.png",
        "masks must be single-channel 8-bit PNG holding class ids",
        "RGB",
    )
    y = np.zeros((H, W), np.uint8)
    y[1, 2] = 7
    rejects(
        make_zip({**entries, "test/masks/c.png": png(y)}),
        "test/masks/c.png",
        "label 7",
        "[1, 2]",
        "0..2 or 255",
    )
    y[1, 2] = 255
    out = parse_upload(make_zip({**entries, "test/masks/c.png": png(y)}), "u.zip", K)
    assert out["y_test"][0, 1, 2] == 255


def test_layout_errors():
    entries, _ = sample()
    no_mask = {k: v for k, v in entries.items() if k != "train/masks/b.png"}
    rejects(make_zip(no_mask), "image train/images/b.png has no mask")
    no_image = {k: v for k, v in entries.items() if k != "train/images/a.png"}
    rejects(make_zip(no_image), "mask train/masks/a.png has no image")
    no_test = {k: v for k, v in entries.items() if not k.startswith("test/")}
    rejects(make_zip(no_test), "'test' has no image/mask pairs")
    rejects(make_zip({}), "'train' has no image/mask pairs")
    for path in (
        "train/labels/a.png",
        "train/images/a.bmp",
        "val/images/a.png",
        "readme.txt",
        "train/images/sub/a.png",
        "train/masks/a.jpg",
    ):
        rejects(make_zip({**entries, path: b"x"}), f"unexpected path {path}", "valid layouts")
    rejects(make_zip({**entries, "train/images/a.jpeg": b"x"}), "share the name")
    two_tops = {f"{i}/{k}": v for i, (k, v) in enumerate(entries.items())}
    rejects(make_zip(two_tops), "unexpected path")
    long = "x\n" * 5000
    msg = rejects(make_zip({**entries, long: b"x"}), "unexpected path")
    assert len(msg) < 600
    assert str(UploadError("two\nlines  ")) == "two lines"


def classes_sample(prefix: str = "") -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """A valid classification upload: train class 2 (b, a) and class 0 (z); test class 1."""
    rng = np.random.default_rng(1)
    x = {n: rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for n in "abzc"}
    c_bytes = jpeg(x["c"])
    entries = {  # out of order: rows come out by class id, then name
        f"{prefix}train/2/b.png": png(x["b"]),
        f"{prefix}train/0/z.png": png(x["z"]),
        f"{prefix}train/2/a.PNG": png(x["a"]),
        f"{prefix}test/1/c.jpeg": c_bytes,
    }
    expected = {
        "x_train": np.stack([x["z"], x["a"], x["b"]]),
        "y_train": np.array([0, 2, 2], np.uint8),
        "x_test": np.asarray(Image.open(io.BytesIO(c_bytes)).convert("RGB"))[None],
        "y_test": np.array([1], np.uint8),
    }
    return entries, expected


@pytest.mark.parametrize("prefix", ["", "pets/"])
def test_valid_classification_zip_and_npz(prefix):
    entries, expected = classes_sample(prefix)
    out = parse_upload(make_zip({**entries, f"{prefix}train/0/.DS_Store": b"x"}), "c.zip", K)
    for a, want in expected.items():
        assert out[a].dtype == np.uint8 and out[a].shape == want.shape, a
        np.testing.assert_array_equal(out[a], want, err_msg=a)
    want = {"n_train": 3, "n_test": 1, "height": H, "width": W, "classes": [0, 2]}
    assert summary(out) == {**want, "max_label": 2, "labels": "classes"}
    # A test label above every training label: max_label reads both splits.
    out["y_test"][0] = 3
    assert summary(out)["classes"] == [0, 2] and summary(out)["max_label"] == 3
    # The same arrays as an .npz (int64 class ids) parse to the same thing.
    as_npz = {**expected, "y_train": expected["y_train"].astype(np.int64)}
    back = parse_upload(to_npz_bytes(as_npz), "c.npz", K)
    for a, want in expected.items():
        assert back[a].dtype == np.uint8
        np.testing.assert_array_equal(back[a], want, err_msg=a)


def test_classification_upload_errors():
    entries, expected = classes_sample()
    rejects(make_zip({**entries, "train/7/q.png": entries["train/0/z.png"]}), "label 7", "0..2")
    for path in ("train/255/q.png", "train/cat/q.png", "train/0/sub/q.png", "train/0/q.txt"):
        rejects(make_zip({**entries, path: b"x"}), f"unexpected path {path}", "valid layouts")
    mixed = {**entries, **sample()[0]}
    rejects(make_zip(mixed), "both images/masks folders", "class-id folders")
    no_test = {k: v for k, v in entries.items() if not k.startswith("test/")}
    rejects(make_zip(no_test), "'test' has no images")
    # An .npz mixing the two label forms, or class ids of another length.
    rejects(
        to_npz_bytes({**expected, "y_test": np.zeros((1, H, W), np.uint8)}),
        "y_train and y_test must both be masks or both class ids",
        filename="m.npz",
    )
    rejects(
        to_npz_bytes({**expected, "y_train": np.zeros(2, np.uint8)}),
        "y_train must be [N,H,W] = [3, 4, 6] or [N] = [3]",
        filename="m.npz",
    )
    rejects(
        to_npz_bytes({**expected, "y_test": np.array([5], np.uint8)}), "label 5", filename="m.npz"
    )


def test_sizes_must_agree():
    entries, _ = sample()
    rejects(make_zip(entries), "train/images/a.png is 4x6 (HxW)", "8x8", image_size=(8, 8))
    small = png(np.zeros((2, 2, 3), np.uint8))
    rejects(
        make_zip({**entries, "test/images/c.JPG": small}),
        "test/images/c.JPG is 2x2",
        "train/images/a.png is 4x6",
    )
    rejects(
        make_zip({**entries, "train/masks/b.png": png(np.zeros((2, 2), np.uint8))}),
        "train/masks/b.png: mask is 2x2",
        "image is 4x6",
    )


def test_upload_level_errors():
    entries, _ = sample()
    rejects(make_zip(entries), ".zip", ".npz", "unsupported file type", filename="up.tar")
    with pytest.raises(UploadError, match=r"num_classes must be 1\.\.255"):
        parse_upload(make_zip(entries), "u.zip", 0)


def test_decoded_size_is_capped_before_decoding_everything():
    arrays = {
        "x_train": np.zeros((6, 32, 32, 3), np.uint8),
        "y_train": np.zeros((6, 32, 32), np.uint8),
        "x_test": np.zeros((2, 32, 32, 3), np.uint8),
        "y_test": np.zeros((2, 32, 32), np.uint8),
    }
    from clseg_jax.serve import example

    data = example.zip_bytes(arrays)
    assert parse_upload(data, "a.zip", 2, Limits(max_decoded_bytes=8 * 32 * 32 * 4))
    with pytest.raises(UploadError, match="8 images of 32x32 decode to 32768 bytes"):
        parse_upload(data, "a.zip", 2, Limits(max_decoded_bytes=8 * 32 * 32 * 4 - 1))
