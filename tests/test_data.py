"""Data: CIFAR loaders on generated archives (exact official format), their errors, the digits set,
normalisation, augmentation and resumable batching."""
from __future__ import annotations

import copy
import dataclasses
import gzip
import hashlib
import pickle
import re
import tarfile

import numpy as np
import pytest

import npapprox.data as data
from npapprox.data import cifar as cifar_mod

import cifar_archive as ca

MD5_10 = "c58f30108f718f92721af3b95e74349a"
MD5_100 = "eb9058c3a382ffc7106e4002c42a8d85"


@pytest.fixture(scope="module")
def members10():
    return ca.cifar10_members()


@pytest.fixture(scope="module")
def members100():
    return ca.cifar100_members()


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _path_form(tmp_path, form, make):
    """The four accepted path forms: archive file, folder holding it, extracted folder, folder
    holding the extracted folder."""
    if form == "archive":
        return make(tmp_path, "archive")
    if form == "dir-with-archive":
        make(tmp_path, "archive")
        return tmp_path
    if form == "folder":
        return make(tmp_path, "folder")
    make(tmp_path, "folder")
    return tmp_path


FORMS = ["archive", "dir-with-archive", "folder", "dir-with-folder"]


def assert_split(got, expected):
    for a, b in zip((got.x_train, got.y_train, got.x_test, got.y_test), expected, strict=True):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert got.x_train.dtype == np.uint8 and got.y_train.dtype == np.int64


# --------------------------------------------------------------------------- CIFAR: decoding

@pytest.mark.parametrize("form", FORMS)
def test_cifar10_decodes_every_path_form(tmp_path, form):
    got = data.load_cifar10(_path_form(tmp_path, form, ca.make_cifar10))
    assert_split(got, ca.expected_cifar10())
    assert got.x_train.shape == (35, 3, 32, 32) and got.x_test.shape == (11, 3, 32, 32)
    assert got.num_classes == 10 and got.class_names == tuple(ca.CIFAR10_NAMES)
    assert got.source.endswith(ca.CIFAR10_ARCHIVE if "archive" in form else ca.CIFAR10_FOLDER)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("label_mode", ["fine", "coarse"])
def test_cifar100_decodes_every_path_form_fine_and_coarse(tmp_path, form, label_mode):
    got = data.load_cifar100(_path_form(tmp_path, form, ca.make_cifar100), label_mode=label_mode)
    assert_split(got, ca.expected_cifar100(label_mode=label_mode))
    assert got.num_classes == (100 if label_mode == "fine" else 20)
    assert got.class_names[0] == f"{label_mode}0" and len(got.class_names) == got.num_classes


def test_cifar100_default_is_fine_and_bad_mode_rejected(tmp_path):
    a = ca.make_cifar100(tmp_path)
    assert data.load_cifar100(a).num_classes == 100
    with pytest.raises(ValueError, match="label_mode must be 'fine' or 'coarse'"):
        data.load_cifar100(a, label_mode="super")


def test_pixel_layout_is_channel_planes_row_major():
    """The oracle is sensitive: a loader reading HWC-interleaved or column-major data would differ."""
    flat = ca.flat_rows(0, 4)
    expected = ca.expected_images(4)
    np.testing.assert_array_equal(flat.reshape(4, 3, 32, 32), expected)
    assert not np.array_equal(flat.reshape(4, 32, 32, 3).transpose(0, 3, 1, 2), expected)
    assert not np.array_equal(flat.reshape(4, 3, 32, 32).transpose(0, 1, 3, 2), expected)
    # spot checks straight from the format's definition: R plane first, then G, then B; row-major
    assert flat[2, 0] == ca.pixel(2, 0, 0, 0) and flat[2, 1] == ca.pixel(2, 0, 0, 1)
    assert flat[2, 32] == ca.pixel(2, 0, 1, 0) and flat[2, 1024] == ca.pixel(2, 1, 0, 0)
    assert flat[3, 2 * 1024 + 5 * 32 + 7] == ca.pixel(3, 2, 5, 7)


def test_training_batches_are_concatenated_in_file_order_whatever_the_archive_order(tmp_path, members10):
    order = ["data_batch_3", "batches.meta", "data_batch_1", "test_batch", "data_batch_5",
             "data_batch_2", "data_batch_4"]
    a = ca.write_archive(tmp_path / ca.CIFAR10_ARCHIVE, ca.CIFAR10_FOLDER, members10, order=order)
    assert_split(data.load_cifar10(a), ca.expected_cifar10())


def test_generated_members_have_the_official_python2_pickle_layout(tmp_path, members10):
    raw = ca.py2_dumps(members10["data_batch_1"])
    assert raw[:3] == b"\x80\x02}"                       # protocol 2, a dict
    assert b"U\x04data" in raw and b"U\x06labels" in raw   # Python 2 str keys (SHORT_BINSTRING)
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    assert b"X\x04" not in raw and b"_codecs" not in raw   # no Python 3 unicode/bytes encodings
    with tarfile.open(ca.make_cifar10(tmp_path)) as tar:
        names = tar.getnames()
    assert names[0] == ca.CIFAR10_FOLDER and f"{ca.CIFAR10_FOLDER}/readme.html" in names
    assert {f"{ca.CIFAR10_FOLDER}/{m}" for m in cifar_mod.CIFAR10.members} <= set(names)


def test_archive_is_preferred_to_a_folder_beside_it(tmp_path, members10):
    ca.make_cifar10(tmp_path, "archive")
    other = copy.deepcopy(members10)
    other["test_batch"][b"labels"] = [0] * ca.N_TEST
    ca.make_cifar10(tmp_path, "folder", other)
    got = data.load_cifar10(tmp_path)
    assert got.source.endswith(ca.CIFAR10_ARCHIVE)
    np.testing.assert_array_equal(got.y_test, ca.expected_cifar10()[3])
    assert np.all(data.load_cifar10(tmp_path / ca.CIFAR10_FOLDER).y_test == 0)


def test_python3_pickled_members_load_too(tmp_path, members10):
    """Re-pickled under Python 3 (str keys, protocol 4): still read."""
    m = {k: pickle.dumps({kk.decode(): vv for kk, vv in v.items()}, protocol=4) for k, v in members10.items()}
    assert_split(data.load_cifar10(ca.make_cifar10(tmp_path, "archive", m)), ca.expected_cifar10())


# --------------------------------------------------------------------------- CIFAR: errors

@pytest.mark.parametrize("loader,archive,folder,digest", [
    (data.load_cifar10, ca.CIFAR10_ARCHIVE, ca.CIFAR10_FOLDER, MD5_10),
    (data.load_cifar100, ca.CIFAR100_ARCHIVE, ca.CIFAR100_FOLDER, MD5_100)])
def test_missing_archive_names_file_places_and_checksum(tmp_path, loader, archive, folder, digest):
    with pytest.raises(FileNotFoundError) as e:
        loader(tmp_path)
    msg = str(e.value)
    for part in (archive, folder, digest, str(tmp_path / archive), "cifar.html"):
        assert part in msg
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope")) + r" \(does not exist\)"):
        loader(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=digest):
        loader(tmp_path / "nope")


def test_missing_archive_hints_at_the_other_data_set(tmp_path):
    ca.make_cifar100(tmp_path)
    with pytest.raises(FileNotFoundError, match="found CIFAR-100 there instead"):
        data.load_cifar10(tmp_path)


def _corrupt_archive(tmp_path, members10, **changes):
    m = copy.deepcopy(members10)
    for name, change in changes.items():
        if change is None:
            del m[name]
        elif callable(change):
            change(m[name])
        else:
            m[name] = change
    return ca.make_cifar10(tmp_path, "archive", m)


def _expect_corrupt(path, *patterns, loader=data.load_cifar10, digest=MD5_10):
    with pytest.raises(ValueError) as e:
        loader(path)
    msg = str(e.value)
    assert str(path) in msg and digest in msg and md5(path) in msg, msg
    for p in patterns:
        assert re.search(p, msg), (p, msg)
    return msg


def test_not_a_gzip_file(tmp_path):
    p = tmp_path / ca.CIFAR10_ARCHIVE
    p.write_bytes(b"<html>404 not found</html>" * 10)
    _expect_corrupt(p, "not a readable gzip-compressed tar file")


def test_truncated_archive(tmp_path):
    a = ca.make_cifar10(tmp_path)
    a.write_bytes(a.read_bytes()[: a.stat().st_size // 2])
    _expect_corrupt(a, "not a readable gzip-compressed tar file", "truncated or damaged")


def test_gzip_of_something_else(tmp_path):
    p = tmp_path / ca.CIFAR10_ARCHIVE
    p.write_bytes(gzip.compress(b"just text, not a tar file\n" * 40))
    _expect_corrupt(p, "not a readable|missing member")


def test_missing_member(tmp_path, members10):
    a = _corrupt_archive(tmp_path, members10, test_batch=None)
    _expect_corrupt(a, r"missing member\(s\) cifar-10-batches-py/test_batch")


def test_wrong_array_size(tmp_path, members10):
    a = _corrupt_archive(tmp_path, members10,
                         data_batch_3=lambda d: d.__setitem__(b"data", d[b"data"][:, :3000].copy()))
    _expect_corrupt(a, "member cifar-10-batches-py/data_batch_3", r"shape \(7, 3000\)", r"\(N, 3072\)")


def test_wrong_dtype(tmp_path, members10):
    a = _corrupt_archive(tmp_path, members10,
                         data_batch_1=lambda d: d.__setitem__(b"data", d[b"data"].astype(np.int32)))
    _expect_corrupt(a, "data_batch_1", "int32", "expected uint8")


def test_label_out_of_range(tmp_path, members10):
    a = _corrupt_archive(tmp_path, members10, test_batch=lambda d: d[b"labels"].__setitem__(4, 10))
    _expect_corrupt(a, "test_batch", r"\[0, 10\]", r"expected \[0, 9\]")


def test_negative_label_and_label_count(tmp_path, members10):
    a = _corrupt_archive(tmp_path, members10, data_batch_2=lambda d: d[b"labels"].__setitem__(0, -1))
    _expect_corrupt(a, "data_batch_2", r"expected \[0, 9\]")
    b = _corrupt_archive(tmp_path / "b", members10, data_batch_5=lambda d: d[b"labels"].pop())
    _expect_corrupt(b, "data_batch_5", "has 6 b'labels' for 7 images")


def test_missing_key_and_wrong_container(tmp_path, members10):
    a = _corrupt_archive(tmp_path, members10, data_batch_4=lambda d: d.pop(b"labels"))
    _expect_corrupt(a, "data_batch_4", "no b'labels' entry")
    b = _corrupt_archive(tmp_path / "b", members10, test_batch=[1, 2, 3])
    _expect_corrupt(b, "test_batch", "holds a list, expected a dict")
    c = _corrupt_archive(tmp_path / "c", members10, **{"batches.meta": {b"label_names": [b"a"]}})
    _expect_corrupt(c, "batches.meta", "10 class names")


def test_garbage_member_and_malicious_pickle(tmp_path, members10):
    a = _corrupt_archive(tmp_path, members10, data_batch_1=b"\x00garbage, not a pickle")
    _expect_corrupt(a, "data_batch_1 cannot be unpickled")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    b = _corrupt_archive(tmp_path / "b", members10, data_batch_2=pickle.dumps(Evil(), protocol=2))
    _expect_corrupt(b, "data_batch_2", "refusing to load")
    assert not marker.exists()


def test_cifar100_coarse_label_out_of_range_only_matters_in_coarse_mode(tmp_path, members100):
    m = copy.deepcopy(members100)
    m["train"][b"coarse_labels"][3] = 20
    a = ca.make_cifar100(tmp_path, "archive", m)
    assert data.load_cifar100(a).num_classes == 100
    _expect_corrupt(a, "cifar-100-python/train", r"expected \[0, 19\]",
                    loader=lambda p: data.load_cifar100(p, label_mode="coarse"), digest=MD5_100)


def test_extracted_folder_incomplete_or_corrupt(tmp_path, members10):
    f = ca.make_cifar10(tmp_path, "folder")
    (f / "data_batch_2").unlink()
    with pytest.raises(ValueError, match=r"incomplete: missing data_batch_2.*" + MD5_10):
        data.load_cifar10(f)
    g = ca.make_cifar10(tmp_path / "g", "folder")
    (g / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(ValueError) as e:
        data.load_cifar10(g)
    msg = str(e.value)
    for part in (str(g / "data_batch_1"), md5(g / "data_batch_1"), "c99cafc152244af753f735de768cd75f", MD5_10):
        assert part in msg, msg
    h = ca.make_cifar10(tmp_path / "h", "folder")
    m = copy.deepcopy(members10)
    m["test_batch"][b"labels"][0] = 99
    ca.write_folder(h, {"test_batch": m["test_batch"]})
    with pytest.raises(ValueError, match=r"test_batch is corrupt.*expected \[0, 9\].*40351d587109b95175f43aff81a1287e"):
        data.load_cifar10(h)


def test_verify_reports_checksum_mismatch_and_accepts_a_match(tmp_path, monkeypatch):
    a = ca.make_cifar10(tmp_path)
    data.load_cifar10(a)                                  # no hashing by default: loads
    with pytest.raises(ValueError, match=f"fails verification: its MD5 is {md5(a)}.*{MD5_10}"):
        data.load_cifar10(a, verify=True)
    with pytest.raises(ValueError, match=f"fails verification.*{MD5_10}"):
        data.load_dataset("cifar10", tmp_path, verify=True)
    f = ca.make_cifar10(tmp_path, "folder")
    with pytest.raises(ValueError, match="data_batch_1 has MD5 .*, expected c99cafc152244af753f735de768cd75f"):
        data.load_cifar10(f, verify=True)
    monkeypatch.setattr(cifar_mod, "CIFAR10", dataclasses.replace(cifar_mod.CIFAR10, archive_md5=md5(a)))
    assert data.load_cifar10(a, verify=True).num_classes == 10
    c = ca.make_cifar100(tmp_path)
    with pytest.raises(ValueError, match=f"its MD5 is {md5(c)}.*{MD5_100}"):
        data.load_cifar100(c, verify=True)


def test_file_md5(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(bytes(range(256)) * 5000)
    assert data.file_md5(p) == hashlib.md5(p.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- load_dataset

def test_load_dataset_cifar(tmp_path):
    ca.make_cifar10(tmp_path)
    ds = data.load_dataset("CIFAR-10", tmp_path)
    assert (ds.name, ds.num_classes, ds.in_channels, ds.image_size) == ("cifar10", 10, 3, 32)
    assert ds.x_train.dtype == np.float32 and ds.x_train.shape == (35, 3, 32, 32)
    assert ds.y_train.dtype == np.int64 and ds.x_train.flags.c_contiguous
    x = ca.expected_cifar10()[0] / np.float32(255)
    np.testing.assert_allclose(ds.x_train, x - x.mean(axis=(1, 2, 3), keepdims=True), atol=1e-6)
    small = data.load_dataset("cifar10", tmp_path, size=16, resize="nearest", max_train=9, max_test=4)
    assert small.x_train.shape == (9, 3, 16, 16) and small.x_test.shape == (4, 3, 16, 16)
    assert small.image_size == 16 and len(small.y_train) == 9
    assert "35 train / 11 test, 3x32x32, 10 classes" in repr(ds)
    assert ds.default_augment() == data.Augment(pad=4, flip=True)
    ca.make_cifar100(tmp_path)
    ds = data.load_dataset("cifar100", tmp_path / ca.CIFAR100_ARCHIVE, normalize="channel", label_mode="coarse")
    assert ds.num_classes == 20 and ds.y_train.max() < 20 and set(ds.norm_stats) == {"mean", "std"}


def test_load_dataset_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data set 'mnist'; choose one of digits, cifar10, cifar100"):
        data.load_dataset("mnist")
    for name, archive, digest in (("cifar10", ca.CIFAR10_ARCHIVE, MD5_10), ("cifar100", ca.CIFAR100_ARCHIVE, MD5_100)):
        with pytest.raises(ValueError, match=f"{name} needs path=.*{re.escape(archive)}.*{digest}"):
            data.load_dataset(name)
    with pytest.raises(FileNotFoundError, match=MD5_10):
        data.load_dataset("cifar10", tmp_path)
    with pytest.raises(ValueError, match="takes no path"):
        data.load_dataset("digits", tmp_path)
    with pytest.raises(ValueError, match="normalize must be one of"):
        data.load_dataset("digits", normalize="batch")
    with pytest.raises(ValueError, match="resize must be one of"):
        data.load_dataset("digits", size=16, resize="cubic")
    with pytest.raises(ValueError, match="cannot pad 8x8 images to the smaller size 4"):
        data.load_dataset("digits", size=4)
    with pytest.raises(ValueError, match="max_train must be positive"):
        data.load_dataset("digits", max_train=0)


# --------------------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def digits_raw():
    return data.digits_split()


def test_load_digits_unchanged_and_equal_to_load_dataset(digits_raw):
    x_tr, y_tr, x_te, y_te = data.load_digits()
    assert x_tr.shape == (1438, 1, 8, 8) and x_te.shape == (359, 1, 8, 8) and x_tr.dtype == np.float32
    raw = digits_raw[0]
    np.testing.assert_array_equal(x_tr, raw - raw.mean(axis=(1, 2, 3), keepdims=True))
    ds = data.load_dataset("digits")
    for a, b in zip((ds.x_train, ds.y_train, ds.x_test, ds.y_test), (x_tr, y_tr, x_te, y_te), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 1, 8)
    assert np.bincount(y_te).min() >= 35                    # stratified


@pytest.mark.parametrize("size,mode", [(16, "pad"), (32, "pad"), (16, "nearest"), (32, "bilinear")])
def test_load_dataset_digits_sizes(digits_raw, size, mode):
    ds = data.load_dataset("digits", size=size, resize=mode)
    assert ds.x_train.shape == (1438, 1, size, size) and ds.image_size == size
    expected = data.resize_images(digits_raw[0], size, mode)
    np.testing.assert_allclose(ds.x_train, expected - expected.mean(axis=(1, 2, 3), keepdims=True), atol=1e-6)


def test_pad_centres_on_zeros(digits_raw):
    x = digits_raw[0][:5]
    out = data.resize_images(x, 16, "pad")
    np.testing.assert_array_equal(out[:, :, 4:12, 4:12], x)
    assert out.sum() == pytest.approx(x.sum()) and np.count_nonzero(out[:, :, :4]) == 0
    odd = data.resize_images(x, 11, "pad")                 # margin 3: 1 above/left, 2 below/right
    np.testing.assert_array_equal(odd[:, :, 1:9, 1:9], x)
    assert np.count_nonzero(odd[:, :, 9:]) == 0 and np.count_nonzero(odd[:, :, :, 9:]) == 0


def _naive_resize(x, size, mode):
    n, c, h, w = x.shape
    out = np.zeros((n, c, size, size), np.float64)
    for i in range(size):
        for j in range(size):
            if mode == "nearest":
                out[:, :, i, j] = x[:, :, min(int((i + 0.5) * h / size), h - 1), min(int((j + 0.5) * w / size), w - 1)]
                continue
            sy = min(max((i + 0.5) * h / size - 0.5, 0), h - 1)
            sx = min(max((j + 0.5) * w / size - 0.5, 0), w - 1)
            y0, x0 = int(np.floor(sy)), int(np.floor(sx))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            wy, wx = sy - y0, sx - x0
            out[:, :, i, j] = ((1 - wy) * (1 - wx) * x[:, :, y0, x0] + (1 - wy) * wx * x[:, :, y0, x1]
                               + wy * (1 - wx) * x[:, :, y1, x0] + wy * wx * x[:, :, y1, x1])
    return out


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("size", [5, 12, 16, 32])
def test_resize_matches_naive_loop(digits_raw, mode, size):
    x = digits_raw[0][:6]
    np.testing.assert_allclose(data.resize_images(x, size, mode), _naive_resize(x, size, mode), atol=1e-6)


def test_resize_special_cases(digits_raw):
    x = digits_raw[0][:3]
    np.testing.assert_array_equal(data.resize_images(x, 16, "nearest"), x.repeat(2, axis=2).repeat(2, axis=3))
    const = np.full((2, 3, 8, 8), 0.25, np.float32)
    np.testing.assert_allclose(data.resize_images(const, 32, "bilinear"), 0.25, atol=1e-7)
    with pytest.raises(ValueError, match="resize mode must be one of"):
        data.resize_images(x, 16, "area")


def test_bilinear_matches_torch(torch, digits_raw):
    x = digits_raw[0][:4]
    for size in (16, 32, 12):
        ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear",
                                              align_corners=False).numpy()
        np.testing.assert_allclose(data.resize_images(x, size, "bilinear"), ref, atol=1e-6)


# --------------------------------------------------------------------------- normalisation

def test_image_mean_formula():
    x = np.random.default_rng(0).integers(0, 256, (9, 3, 5, 5), dtype=np.uint8)
    ref = x.astype(np.float64) / 255
    ref -= ref.mean(axis=(1, 2, 3), keepdims=True)          # over all pixels *and* channels
    out = data.image_mean_normalize(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-6)
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), 0, atol=1e-6)


def test_channel_formula_uses_training_statistics():
    rng = np.random.default_rng(1)
    x_tr = rng.integers(0, 256, (20, 3, 6, 6), dtype=np.uint8)
    x_te = rng.integers(0, 200, (7, 3, 6, 6), dtype=np.uint8)
    tr, te, stats = data.normalize_splits(x_tr, x_te, "channel")
    m = (x_tr / 255).mean(axis=(0, 2, 3))
    s = (x_tr / 255).std(axis=(0, 2, 3))
    np.testing.assert_allclose(stats["mean"], m, rtol=1e-12)
    np.testing.assert_allclose(stats["std"], s, rtol=1e-12)
    np.testing.assert_allclose(tr, (x_tr / 255 - m[:, None, None]) / s[:, None, None], atol=1e-5)
    np.testing.assert_allclose(te, (x_te / 255 - m[:, None, None]) / s[:, None, None], atol=1e-5)
    np.testing.assert_allclose(tr.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(tr.std(axis=(0, 2, 3)), 1, atol=1e-5)
    none_tr, _, _ = data.normalize_splits(x_tr, x_te, "none")
    np.testing.assert_allclose(none_tr, x_tr / 255, atol=1e-7)
    with pytest.raises(ValueError, match="normalize must be one of"):
        data.normalize_splits(x_tr, x_te, "per-pixel")


def test_channel_constant_channel_keeps_std_one():
    x = np.zeros((4, 2, 3, 3), np.float32)
    x[:, 1] = np.arange(36).reshape(4, 3, 3) / 36
    tr, _, stats = data.normalize_splits(x, x, "channel")
    assert stats["std"][0] == 0 and np.all(np.isfinite(tr)) and np.all(tr[:, 0] == 0)


# --------------------------------------------------------------------------- augmentation

def _naive_augment(x, pad, offsets, flips):
    n, c, h, w = x.shape
    out = np.zeros_like(x)
    for k in range(n):
        dy, dx = offsets[k]
        for ch in range(c):
            for r in range(h):
                for col in range(w):
                    sr, sc = r + dy - pad, col + dx - pad           # source pixel of the padded window
                    v = x[k, ch, sr, sc] if 0 <= sr < h and 0 <= sc < w else 0
                    out[k, ch, r, w - 1 - col if flips[k] else col] = v
    return out


@pytest.mark.parametrize("pad", [1, 4])
def test_augment_matches_naive_loop(pad):
    x = np.random.default_rng(5).standard_normal((12, 3, 9, 9)).astype(np.float32)
    before = x.copy()
    out = data.Augment(pad=pad)(x, np.random.default_rng(42))
    draws = np.random.default_rng(42)                  # the documented draw order
    offsets = draws.integers(0, 2 * pad + 1, size=(12, 2))
    flips = draws.random(12) < 0.5
    assert flips.any() and not flips.all() and len({tuple(o) for o in offsets}) > 3
    np.testing.assert_array_equal(out, _naive_augment(x, pad, offsets, flips))
    np.testing.assert_array_equal(x, before)           # input untouched
    assert out.dtype == np.float32


def test_crop_and_flip_exact_pixels():
    x = np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4) + 1
    np.testing.assert_array_equal(data.crop(x, 2, [[2, 2], [2, 2]]), x)      # centre = identity
    shifted = data.crop(x, 2, [[0, 0], [4, 1]])
    np.testing.assert_array_equal(shifted[0, 0], [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 2], [0, 0, 5, 6]])
    np.testing.assert_array_equal(shifted[1, 0], [[0, 25, 26, 27], [0, 29, 30, 31], [0, 0, 0, 0], [0, 0, 0, 0]])
    flipped = data.flip(x, [True, False])
    np.testing.assert_array_equal(flipped[0, 0, 0], [4, 3, 2, 1])
    np.testing.assert_array_equal(flipped[1], x[1])
    with pytest.raises(ValueError, match=r"offsets must lie in \[0, 4\]"):
        data.crop(x, 2, [[0, 5], [0, 0]])


def test_augment_determinism_and_validation():
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    aug = data.Augment.for_size(32)
    assert aug == data.Augment(pad=4) and data.Augment.for_size(16).pad == 2 and data.Augment.for_size(8).pad == 1
    a = aug(x, np.random.default_rng(7))
    np.testing.assert_array_equal(a, aug(x, np.random.default_rng(7)))
    assert not np.array_equal(a, aug(x, np.random.default_rng(8)))
    np.testing.assert_array_equal(data.Augment(pad=0, flip=False)(x, np.random.default_rng(0)), x)
    for bad in ({"pad": -1}, {"pad": 1.5}, {"p_flip": 2}):
        with pytest.raises(ValueError):
            data.Augment(**bad)


# --------------------------------------------------------------------------- batching

def _tagged(n=23, size=6):
    """Image k is constant k + 1 (a crop keeps k + 1 as its maximum), label k % 5."""
    x = np.broadcast_to((np.arange(n, dtype=np.float32) + 1)[:, None, None, None], (n, 2, size, size)).copy()
    return x, np.arange(n) % 5


def _index_of(xb):
    return xb.reshape(len(xb), -1).max(axis=1).astype(int) - 1


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_example_once_per_epoch_with_its_label(drop_last):
    x, y = _tagged()
    aug = data.Augment(pad=2)
    seen = []
    out = list(data.batches(x, y, 5, 3, aug, drop_last, epoch=2))
    assert len(out) == (4 if drop_last else 5) == data.batches_per_epoch(23, 5, drop_last)
    for xb, yb in out:
        idx = _index_of(xb)
        np.testing.assert_array_equal(yb, y[idx])
        seen.extend(idx)
    assert [len(yb) for _, yb in out][-1] == (5 if drop_last else 3)
    assert sorted(seen) == (sorted(data.epoch_permutation(3, 2, 23)[:20]) if drop_last
                            else list(range(23)))
    assert len(set(seen)) == len(seen)


def test_seed_scheme_is_the_documented_one():
    x, y = _tagged()
    aug = data.Augment(pad=2)
    order = np.random.default_rng([11, 1, 4]).permutation(23)
    out = list(data.batches(x, y, 5, 11, aug, epoch=4))
    for i, (xb, yb) in enumerate(out):
        idx = order[i * 5:(i + 1) * 5]
        np.testing.assert_array_equal(yb, y[idx])
        np.testing.assert_array_equal(xb, aug(x[idx], np.random.default_rng([11, 2, 4, i])))
    np.testing.assert_array_equal(data.epoch_permutation(11, 4, 23), order)
    # the reason for the tags: without them epoch e's permutation stream is batch 0's stream
    assert np.random.default_rng([11, 4]).random() == np.random.default_rng([11, 4, 0]).random()


def test_deterministic_given_seed_and_epochs_differ():
    x, y = _tagged()
    aug = data.Augment(pad=2)

    def run(seed, epoch):
        return [yb for _, yb in data.batches(x, y, 4, seed, aug, epoch=epoch)]

    assert all(np.array_equal(a, b) for a, b in zip(run(0, 0), run(0, 0), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(run(0, 0), run(0, 1), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(run(0, 0), run(1, 0), strict=True))


@pytest.mark.parametrize("drop_last", [False, True])
def test_resuming_mid_epoch_reproduces_the_same_batches(drop_last):
    x, y = _tagged()
    aug = data.Augment(pad=2)
    full = list(data.batches(x, y, 4, 9, aug, drop_last, epoch=3))
    for start in range(len(full) + 1):
        tail = list(data.batches(x, y, 4, 9, aug, drop_last, epoch=3, start=start))
        assert len(tail) == len(full) - start
        for (a, ay), (b, by) in zip(tail, full[start:], strict=True):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(ay, by)


def test_batch_stream_resumes_across_epochs():
    x, y = _tagged()
    aug = data.Augment(pad=1)
    stream = data.batch_stream(x, y, 4, 5, aug)                  # 5 batches per epoch (drop_last)
    full = [next(stream) for _ in range(17)]
    assert [(b.epoch, b.index) for b in full[4:7]] == [(0, 4), (1, 0), (1, 1)]
    assert [b.iteration for b in full] == list(range(17))
    for k in (0, 3, 5, 12):
        resumed = data.batch_stream(x, y, 4, 5, aug, start_iteration=k)
        for want in full[k:]:
            got = next(resumed)
            assert (got.epoch, got.index, got.iteration) == (want.epoch, want.index, want.iteration)
            np.testing.assert_array_equal(got.x, want.x)
            np.testing.assert_array_equal(got.y, want.y)
    with pytest.raises(ValueError, match="make no batch"):
        next(data.batch_stream(x[:3], y[:3], 4, 0))


def test_generator_rng_and_no_rng():
    x, y = _tagged()
    aug = data.Augment(pad=2)
    a = list(data.batches(x, y, 6, np.random.default_rng(2), aug))
    b = list(data.batches(x, y, 6, np.random.default_rng(2), aug))
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    plain = list(data.batches(x, y, 6))
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in plain]), y)
    plain[0][0][...] = -1
    assert x.min() > 0                                             # batches are copies
    with pytest.raises(ValueError, match="augmentation needs rng"):
        next(data.batches(x, y, 6, None, aug))
    with pytest.raises(ValueError, match="need an int seed"):
        next(data.batches(x, y, 6, np.random.default_rng(0), start=1))


def test_seed_keyword_and_boolean_augment():
    """The trainer's call: batches(x, y, bs, seed=s, epoch=e, augment=True, start=k)."""
    x, y = _tagged(size=32)
    want = list(data.batches(x, y, 4, 6, data.Augment(pad=4, flip=True), epoch=1, start=2))
    got = list(data.batches(x, y, 4, seed=6, epoch=1, augment=True, start=2))
    assert len(got) == len(want) == 4
    for (a, ay), (b, by) in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ay, by)
    plain = list(data.batches(x, y, 4, seed=6, epoch=1, augment=False))
    for (a, ay) in plain:
        np.testing.assert_array_equal(a, x[_index_of(a)])
        np.testing.assert_array_equal(ay, y[_index_of(a)])
    with pytest.raises(ValueError, match="rng or seed, not both"):
        next(data.batches(x, y, 4, 1, seed=1))
    with pytest.raises(TypeError, match="seed must be an integer"):
        next(data.batches(x, y, 4, seed=True))


def test_batches_argument_errors():
    x, y = _tagged()
    with pytest.raises(ValueError, match="x has 23 examples but y has 22"):
        next(data.batches(x, y[:-1], 4, 0))
    with pytest.raises(ValueError, match="batch_size must be positive"):
        next(data.batches(x, y, 0, 0))
    with pytest.raises(ValueError, match=r"start must lie in \[0, 6\]"):
        next(data.batches(x, y, 4, 0, start=7))
    with pytest.raises(ValueError, match="seed must be non-negative"):
        next(data.batches(x, y, 4, -1))
    with pytest.raises(TypeError, match="seed must be an integer"):
        next(data.batches(x, y, 4, 1.5))


def test_iterate_minibatches_unchanged():
    x, y = _tagged()
    out = list(data.iterate_minibatches(x, y, 10))
    assert [len(b) for _, b in out] == [10, 10, 3]
    shuffled = np.concatenate([b for _, b in data.iterate_minibatches(x, y, 10, np.random.default_rng(0))])
    np.testing.assert_array_equal(shuffled, y[np.random.default_rng(0).permutation(23)])
