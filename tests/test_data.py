"""Tests of ddpm_course.data: data sets, transforms, grids, 2-D toys."""
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_course.data import (
    DATASETS,
    DatasetDownloadError,
    ImageFolderDataset,
    from_uint8,
    get_dataloader,
    image_grid,
    load_dataset,
    load_digits_with_labels,
    make_toy_2d,
    to_uint8,
)


def test_uint8_round_trip_and_clipping():
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(from_uint8(u)), u)
    assert from_uint8(u).min() == -1 and from_uint8(u).max() == 1
    a = np.array([-3.0, -1.0, 0.0, 1.0, 3.0], dtype=np.float32)
    assert to_uint8(a).dtype == np.uint8 and to_uint8(a).tolist() == [0, 0, 128, 255, 255]


def test_digits_match_sklearn():
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = load_digits_with_labels(split="all")
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    np.testing.assert_allclose((x[:, 0].numpy() + 1) / 2 * 16, d.images, atol=1e-5)
    assert torch.equal(y, torch.from_numpy(d.target).long())


def test_digits_splits_are_disjoint_stratified_and_fixed():
    xa, _ = load_digits_with_labels(split="all")
    xtr, ytr = load_digits_with_labels(split="train")
    xte, yte = load_digits_with_labels(split="test")
    assert len(xtr) + len(xte) == len(xa) == 1797
    rows = lambda x: sorted(tuple(r) for r in x.flatten(1).tolist())
    assert rows(torch.cat([xtr, xte])) == rows(xa)  # together they are exactly the whole set
    assert torch.bincount(yte, minlength=10).min() >= 28
    assert torch.equal(load_digits_with_labels(split="test")[0], xte)


def test_load_dataset_digits_items_and_sizes():
    ds = load_dataset("digits", image_size=8, split="train", root=None)
    assert len(ds) == 1500
    x = ds[0]
    assert isinstance(x, torch.Tensor) and x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    ds16 = load_dataset("digits", image_size=16)
    assert ds16[0].shape == (1, 16, 16)
    assert torch.equal(ds16[0][:, ::2, ::2], x)  # pixel repetition, no blur
    assert torch.equal(ds16[0][:, 1::2, 1::2], x)
    xl, yl = load_dataset("digits", with_labels=True)[3]
    assert xl.shape == (1, 8, 8) and yl.dtype == torch.int64
    assert load_dataset("digits", channels=3)[0].shape == (3, 8, 8)


@pytest.mark.parametrize("bad,word", [(dict(name="imagenet"), "unknown data set 'imagenet'"), (dict(split="val"), "split must be"),
                                      (dict(image_size=0), "image_size must be an int >= 1, got 0"),
                                      (dict(image_size=8.0), "image_size must be an int >= 1, got 8.0")])
def test_load_dataset_bad_arguments(bad, word):
    kw = dict(name="digits") | bad
    with pytest.raises(ValueError, match=word) as e:
        load_dataset(**kw)
    if "name" in bad:
        for n in DATASETS:
            assert n in str(e.value)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "fgvc_aircraft"])
def test_torchvision_sets_fail_clearly_offline(tmp_path, name, monkeypatch):
    "Offline (made so even where the machine has a network), a download fails naming the offline alternatives."
    def offline(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    with pytest.raises(DatasetDownloadError) as e:
        load_dataset(name, root=tmp_path, timeout=5)
    msg = str(e.value)
    assert name in msg and "download" in msg and "'digits'" in msg and "folder" in msg


def _write_images(root):
    rng = np.random.default_rng(0)
    (root / "a" / "b").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / "a" / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (33, 17), dtype=np.uint8)).save(root / "a" / "b" / "gray.png")
    Image.fromarray(np.full((12, 12), 255, dtype=np.uint8)).save(root / "white.PNG")
    (root / "notes.txt").write_text("not an image and not an image extension")


def test_image_folder_recursive_mixed_colour(tmp_path):
    _write_images(tmp_path)
    ds = load_dataset(tmp_path, image_size=10)
    assert len(ds) == 3 and ds.channels == 3
    for i in range(3):
        assert ds[i].shape == (3, 10, 10) and ds[i].min() >= -1 and ds[i].max() <= 1
    white = [f.name for f in ds.files].index("white.PNG")
    assert torch.allclose(ds[white], torch.ones(3, 10, 10))


def test_image_folder_grayscale_and_centre_crop(tmp_path):
    # a 10 x 30 image: left third black, middle third white, right third black; the centre crop keeps the white
    img = np.zeros((10, 30), dtype=np.uint8)
    img[:, 10:20] = 255
    (tmp_path / "deep" / "er").mkdir(parents=True)
    Image.fromarray(img).save(tmp_path / "deep" / "er" / "stripe.png")
    ds = load_dataset(str(tmp_path), image_size=10)
    assert ds.channels == 1 and len(ds) == 1
    x = ds[0]
    assert x.shape == (1, 10, 10)
    assert torch.equal(x, torch.ones_like(x))
    assert ImageFolderDataset(tmp_path, image_size=10, channels=3)[0].shape == (3, 10, 10)


def test_image_folder_unreadable_file(tmp_path):
    _write_images(tmp_path)
    (tmp_path / "a" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_dataset(tmp_path, image_size=8)


def test_image_folder_file_corrupted_after_loading(tmp_path):
    _write_images(tmp_path)
    ds = load_dataset(tmp_path, image_size=8)
    ds.files[0].write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read image"):
        ds[0]


def test_image_folder_empty(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match="no image files"):
        load_dataset(tmp_path)


def test_dataloader_seeded_and_drop_last():
    ds = load_dataset("digits")
    a = [b for b in get_dataloader(ds, 100, seed=1)]
    b = [b for b in get_dataloader(ds, 100, seed=1)]
    c = next(iter(get_dataloader(ds, 100, seed=2)))
    assert len(a) == 15 and all(x.shape == (100, 1, 8, 8) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c)
    assert len(get_dataloader(ds, 64)) == 1500 // 64
    assert len(get_dataloader(ds, 64, drop_last=False)) == -(-1500 // 64)
    unshuffled = next(iter(get_dataloader(ds, 4, shuffle=False)))
    assert torch.equal(unshuffled, torch.stack([ds[i] for i in range(4)]))
    with pytest.raises(ValueError, match="larger than the data set"):
        get_dataloader(ds, 2000)


def test_image_grid_layout():
    x = torch.full((5, 1, 8, 8), -1.0)
    x[3] = 1.0
    g = image_grid(x, nrow=3, padding=2, scale=2)
    assert g.size == (3 * 18 + 2, 2 * 18 + 2) and g.mode == "L"
    a = np.array(g)
    assert (a[2:18, 2:18] == 0).all()  # first image, black
    assert (a[20:36, 2:18] == 255).all()  # fourth image: second row, first column, white
    assert (a[0:2] == 255).all()  # padding
    rgb = image_grid(np.zeros((4, 8, 8, 3), dtype=np.uint8))  # N x H x W x C arrays, as in samples.npz
    assert rgb.mode == "RGB" and rgb.size == (2 * 33 + 1, 2 * 33 + 1)  # auto scale 4: 32-pixel images
    with pytest.raises(ValueError, match=r"C in \(1, 3\), got shape \(2, 2, 8, 8\)"):
        image_grid(torch.zeros(2, 2, 8, 8))


@pytest.mark.parametrize("name", ["moons", "swiss_roll"])
def test_toy_2d(name):
    p = make_toy_2d(name, 3000, seed=0)
    assert p.shape == (3000, 2) and p.dtype == torch.float32
    assert p.mean(0).abs().max() < 1e-4 and (p.std(0) - 1).abs().max() < 1e-2
    assert torch.equal(p, make_toy_2d(name, 3000, seed=0)) and not torch.equal(p, make_toy_2d(name, 3000, seed=1))


def test_toy_2d_moons_shape():
    # two interleaved half circles: points near the fitted arcs, few in between
    from sklearn.datasets import make_moons

    raw, labels = make_moons(2000, noise=0.0, random_state=0)
    p = make_toy_2d("moons", 2000, noise=0.0).numpy()
    back = p * raw.std(0) + raw.mean(0)
    np.testing.assert_allclose(back, raw, atol=1e-5)
    with pytest.raises(ValueError, match="moons"):
        make_toy_2d("spiral")


def _write_fake_mnist(root, folder, n_train=5, n_test=3):
    # the idx files torchvision reads (what the download would have unpacked); offline, no download needed
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[0] = 255  # a white image: must come out as all ones
        labels = np.arange(n, dtype=np.uint8) % 10
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(np.array([0x803, n, 28, 28], dtype=">i4").tobytes() + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(np.array([0x801, n], dtype=">i4").tobytes() + labels.tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_branch_on_local_files(tmp_path, name, folder):
    _write_fake_mnist(tmp_path, folder)
    ds = load_dataset(name, root=tmp_path, download=False)
    assert len(ds) == 5
    x = ds[0]
    assert isinstance(x, torch.Tensor) and x.shape == (1, 28, 28) and torch.equal(x, torch.ones_like(x))
    assert ds[1].min() >= -1 and ds[1].max() <= 1 and ds[1].min() < 0
    assert len(load_dataset(name, split="test", root=tmp_path, download=False)) == 3
    assert len(load_dataset(name, split="all", root=tmp_path, download=False)) == 8
    small = load_dataset(name, image_size=16, channels=3, root=tmp_path, download=False)
    assert small[0].shape == (3, 16, 16)
    xl, yl = load_dataset(name, with_labels=True, root=tmp_path, download=False)[3]
    assert xl.shape == (1, 28, 28) and int(yl) == 3
    batch = next(iter(get_dataloader(ds, 4, seed=0)))
    assert batch.shape == (4, 1, 28, 28)
