"""Tests of ddpm_course.metrics: Fréchet distance, the feature classifier, sample scoring."""
import json

import numpy as np
import pytest
import scipy.linalg
import torch

from ddpm_course.data import load_dataset, load_digits_with_labels, to_uint8
from ddpm_course.sampling import sample_ddim
from ddpm_course.checkpoint import CheckpointError, load_model, pretrained_dir
from ddpm_course.metrics import (
    class_entropy,
    classifier_accuracy,
    classifier_for,
    evaluate_samples,
    extract_features,
    memorisation_check,
    nearest_training,
    feature_frechet_distance,
    frechet_distance,
    gaussian_stats,
    load_classifier,
    prepare_images,
    save_classifier,
    shift_augment,
    train_classifier,
)


def scipy_fd(a: np.ndarray, b: np.ndarray) -> float:
    "The textbook computation, through scipy.linalg.sqrtm."
    m1, m2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real))


@pytest.fixture(scope="module")
def feats():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(600, 20))
    b = rng.normal(size=(300, 20)) @ rng.normal(size=(20, 20)) * 0.4 + rng.normal(size=20)
    return a, b


@pytest.fixture(scope="module")
def clf():
    return load_classifier("pretrained:digits_classifier")


def test_fd_matches_scipy_sqrtm(feats):
    a, b = feats
    ref = scipy_fd(a, b)
    assert feature_frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)


def test_fd_is_zero_on_itself_and_symmetric(feats):
    a, b = feats
    assert abs(feature_frechet_distance(a, a)) < 1e-9
    assert feature_frechet_distance(a, b) == pytest.approx(feature_frechet_distance(b, a), rel=1e-10)
    assert feature_frechet_distance(torch.from_numpy(a), b) == pytest.approx(feature_frechet_distance(a, b))


def test_fd_grows_with_a_shift_by_its_square(feats):
    a, _ = feats
    e = np.zeros(a.shape[1])
    e[3] = 1.0
    d = [feature_frechet_distance(a, a + c * e) for c in (0.5, 1.0, 2.0, 4.0)]
    assert d == pytest.approx([0.25, 1.0, 4.0, 16.0], abs=1e-8)  # a pure mean shift adds |shift|^2


def test_fd_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2; commuting (diagonal) covariances: sum (sqrt a - sqrt b)^2
    assert frechet_distance([1.0], [[9.0]], [3.0], [[1.0]]) == pytest.approx(4.0 + 4.0)
    ca, cb = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    want = ((np.sqrt(ca) - np.sqrt(cb)) ** 2).sum()
    assert frechet_distance(np.zeros(3), np.diag(ca), np.zeros(3), np.diag(cb)) == pytest.approx(want)


def test_fd_handles_singular_covariances():
    rng = np.random.default_rng(1)
    a = np.c_[rng.normal(size=(200, 3)), np.zeros((200, 2))]  # rank 3 of 5
    b = np.c_[rng.normal(size=(200, 3)), np.zeros((200, 2))] + 0.5
    got = feature_frechet_distance(a, b)
    assert np.isfinite(got) and got == pytest.approx(scipy_fd(a[:, :3], b[:, :3]) + 2 * 0.5**2, rel=1e-8)


def test_fd_bad_shapes():
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(np.zeros((1, 5)))


def test_class_entropy():
    assert class_entropy(np.arange(1000) % 10, 10) == pytest.approx(np.log(10))
    assert class_entropy(np.zeros(50, dtype=int), 10) == 0.0
    assert class_entropy(np.array([0, 0, 1, 1]), 10) == pytest.approx(np.log(2))


def test_shift_augment_moves_whole_images():
    x = torch.randn(64, 2, 6, 6)
    y = shift_augment(x, 1, torch.Generator().manual_seed(0))
    pad = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    for i in range(len(x)):
        assert any(torch.equal(y[i], pad[i, :, r : r + 6, c : c + 6]) for r in range(3) for c in range(3))
    assert not torch.equal(y, x)
    assert torch.equal(shift_augment(x, 0), x)


def test_shipped_classifier(clf):
    cfg = json.loads((pretrained_dir("digits_classifier") / "config.json").read_text())
    assert cfg["info"]["dataset"] == "digits" and clf.config == cfg["net"]["config"] and cfg["net"]["class"] == "ImageClassifier"
    acc = classifier_accuracy(clf, load_dataset("digits", split="test", with_labels=True))
    assert acc >= 0.98
    assert (pretrained_dir("digits_classifier") / "model.safetensors").stat().st_size < 1_000_000
    for f in ("log.csv", "README.md"):
        assert (pretrained_dir("digits_classifier") / f).is_file()
    assert classifier_for("digits").config == clf.config


def test_save_load_round_trip(tmp_path, clf):
    save_classifier(clf, tmp_path / "c")
    again = load_classifier(tmp_path / "c")
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        assert torch.equal(again.features(x), clf.features(x))


def test_load_errors(tmp_path, clf):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_classifier(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="class UNet; expected ImageClassifier"):
        load_classifier("pretrained:digits")
    save_classifier(clf, tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_classifier(tmp_path / "c")
    with pytest.raises(ValueError, match="no classifier is shipped"):
        classifier_for("cifar10")


def test_train_classifier_short_run(tmp_path):
    c = train_classifier("digits", out_dir=tmp_path, steps=80, batch_size=64, progress=False)
    assert c.test_accuracy > 0.7
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "config.json", "log.csv"}
    assert (tmp_path / "log.csv").read_text().splitlines()[0].startswith("step,")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["info"]["training"]["steps"] == 80 and cfg["step"] == 80


def test_prepare_images_forms_and_errors():
    x, _ = load_digits_with_labels(split="test")
    u8 = to_uint8(x[:6]).permute(0, 2, 3, 1).numpy()
    assert torch.allclose(prepare_images(u8, 8, 1), x[:6], atol=1 / 127.5)
    assert torch.equal(prepare_images(u8.repeat(2, 1).repeat(2, 2), 8, 1), prepare_images(u8, 8, 1))
    assert torch.equal(prepare_images(x[:6], 8, 1), prepare_images(u8, 8, 1))
    with pytest.raises(ValueError, match="uint8"):
        prepare_images(u8.astype(np.float32), 8, 1)
    with pytest.raises(ValueError, match="uint8"):
        prepare_images(u8[0], 8, 1)
    with pytest.raises(ValueError, match="channel"):
        prepare_images(np.repeat(u8, 3, axis=3), 8, 1)
    with pytest.raises(ValueError, match="at least 8x8"):
        prepare_images(u8[:, :4, :4], 8, 1)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split="train").images, load_dataset("digits", split="test").images


def test_default_pool_is_the_held_out_split(clf, digits):
    x_train, x_test = digits
    r = evaluate_samples(x_train, classifier=clf)
    assert r.n_reference == len(x_test) == 297 and r.n == 300 and r.n_sets == r.n_floor_sets == 5
    # the pool shares no image with the training split
    assert torch.cdist(x_test.flatten(1), x_train.flatten(1)).min() > 0
    # training digits scored against it get no advantage: exactly the floor's images, ratio 1 within its interval
    assert r.ratio_low < 1 < r.ratio_high and abs(r.ratio - 1) < 0.25


def test_fresh_real_digits_score_at_the_floor(clf, digits):
    x_train, _ = digits
    hits = 0
    for s in range(6):
        p = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(s))
        r = evaluate_samples(x_train[p[750:]], classifier=clf, train=x_train[p[:750]], seed=s)
        assert 0.6 < r.ratio < 1.6 and r.floor_low < r.floor < r.floor_high and not r.memorisation.memorised
        hits += r.ratio_low < 1 < r.ratio_high
    assert hits >= 5


def test_evaluate_samples_noise_blur_and_collapse(clf, digits):
    x_train, _ = digits
    y = load_dataset("digits", split="train", with_labels=True).labels
    p = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(1))
    floor_half, fake, fake_y = x_train[p[:750]], x_train[p[750:]], y[p[750:]]
    real = evaluate_samples(fake, classifier=clf, train=floor_half)
    torch.manual_seed(0)
    noisy = evaluate_samples((fake + 0.4 * torch.randn_like(fake)).clamp(-1, 1), classifier=clf, train=floor_half)
    assert noisy.ratio_low > real.ratio_high and noisy.floor == pytest.approx(real.floor)
    collapsed = evaluate_samples(fake[fake_y < 5], classifier=clf, train=floor_half)
    assert collapsed.entropy == pytest.approx(np.log(5), abs=0.05) and real.entropy > 2.2 and collapsed.ratio_low > 2
    for word in ("floor", "ratio", "entropy", "held-out", "nearest training image", "[", "95%"):
        assert word in str(real)


def test_nearest_training_matches_brute_force(digits):
    x_train, x_test = digits
    d, i = nearest_training(x_test[:30], x_train, batch_size=7)
    brute = ((x_test[:30, None] - x_train[None]) ** 2).flatten(2).sum(-1).sqrt()
    assert torch.allclose(d, brute.min(1).values, atol=1e-5) and torch.equal(i, brute.argmin(1))
    with pytest.raises(ValueError, match="same C, H, W"):
        nearest_training(x_test[:3], x_train[:, :, :4])


def test_memorisation_check_catches_copies_and_passes_fresh_digits(digits):
    x_train, x_test = digits
    torch.manual_seed(0)
    fresh, held_out = x_test[:150], x_test[150:]
    copies = x_train[torch.randperm(len(x_train))[:300]]
    ok = memorisation_check(fresh, x_train, held_out)
    assert not ok.memorised and 0.8 < ok.median_ratio < 1.25 and ok.share_near < ok.limit
    for noise in (0.0, 0.1):
        m = memorisation_check((copies + noise * torch.randn_like(copies)).clamp(-1, 1), x_train, held_out)
        assert m.memorised and m.share_near > 0.9 and m.median_ratio < 0.5
    half = memorisation_check(torch.cat([fresh, copies[:150]]), x_train, held_out)  # half copies: still caught
    assert half.memorised and 0.45 < half.share_near < 0.6
    assert "MEMORISATION" in str(m) and "no memorisation" in str(ok)
    with pytest.raises(ValueError, match="quantile"):
        memorisation_check(fresh, x_train, held_out, quantile=0.2, limit=0.1)


def test_shipped_model_does_not_memorise(clf):
    x = sample_ddim(load_model("pretrained:digits"), 300, steps=20, seed=0)
    r = evaluate_samples(x, classifier=clf)
    assert not r.memorisation.memorised and 0.8 < r.memorisation.median_ratio < 1.2
    assert r.ratio < 2.5 and r.entropy > 2.2


def test_evaluate_samples_errors(clf, digits, tmp_path):
    x_train, _ = digits
    with pytest.raises(ValueError, match="n_sets must be >= 2"):
        evaluate_samples(x_train[:100], classifier=clf, n_sets=1)
    with pytest.raises(ValueError, match="at least 10 generated"):
        evaluate_samples(x_train[:9], classifier=clf)
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no held-out split"):
        evaluate_samples(x_train[:100], dataset=str(tmp_path), classifier=clf)


def test_evaluate_samples_uint8(clf):
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (1700, 8, 8, 1), dtype=np.uint8)
    r = evaluate_samples(u8, classifier=clf, n_sets=3)
    assert r.n == 500 and r.n_sets == 3 and r.n_floor_sets == 3  # N = min(1700, 1500) // 3
    assert r.ratio_low > 20  # uniform noise is nothing like a digit
    feats, labels = extract_features(clf, u8[:10])
    assert feats.shape == (10, 64) and feats.dtype == np.float64 and labels.shape == (10,)


def test_features_are_computed_on_the_classifiers_device(clf):
    "extract_features moves the images to the classifier's device (here the CPU, passed explicitly) and returns CPU arrays."
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    f, y = extract_features(clf.to(torch.device("cpu")), x)
    with torch.no_grad():
        want = clf.features(prepare_images(x, 8, 1))
    assert isinstance(f, np.ndarray) and f.dtype == np.float64 and f.shape == (6, clf.config["feature_dim"])
    np.testing.assert_allclose(f, want.double().numpy(), rtol=1e-6)
    assert np.array_equal(y, clf.head(want).argmax(1).numpy())
