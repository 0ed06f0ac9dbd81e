"""The evaluation protocol: k-NN precision/recall, density/coverage, FD against
closed forms, diversity and pixel statistics on constructed inputs, the
no-selection rule (validation never reads the eval split nor a headline
feature space), and eval scoring exactly the pixels of generate's PNG."""
import json
import math
import os

import numpy as np
import pytest
import torch

from flashcore import cli
from flashcore import data as fdata
from flashcore import evaluate as ev
from flashcore.metrics import ARCHS, Classifier, ClassifierConfig, class_diversity, features_and_logits, \
    frechet_distance, knn_radii, load_classifier, manifold_metrics, mean_pairwise_distance, out_of_range_share, \
    pixel_stats, save_classifier, user_images
from flashcore.models import Denoiser, save_pretrained

from _fixtures import TINY_UNET, tiny_teacher  # noqa: F401  (fixture)

K = 5


# -- precision, recall, density, coverage --------------------------------------------------------

def test_knn_radii_match_a_sorted_distance_matrix():
    f = torch.randn(60, 7, dtype=torch.float64)
    d = torch.cdist(f, f)
    d.fill_diagonal_(float("inf"))                       # the point itself is no neighbour
    torch.testing.assert_close(knn_radii(f, 3), d.sort(1).values[:, 2], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="k = 60"):
        knn_radii(f, 60)


def test_identical_sets_have_full_precision_recall_and_coverage():
    real = torch.randn(300, 16, dtype=torch.float64)
    m = manifold_metrics(real, real.clone(), K)
    assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["coverage"] == 1.0
    # each real ball holds its centre and its k neighbours (no ties in continuous data)
    assert m["density"] == pytest.approx((K + 1) / K, rel=1e-12)


def test_disjoint_far_apart_sets_score_zero():
    real = torch.randn(300, 16, dtype=torch.float64)
    m = manifold_metrics(real, torch.randn(300, 16, dtype=torch.float64) + 100.0, K)
    assert m == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_a_collapsed_set_is_precise_but_recalls_almost_nothing():
    real = torch.randn(300, 16, dtype=torch.float64)
    fake = real[0] + 1e-3 * torch.randn(300, 16, dtype=torch.float64)     # every sample next to one real point
    m = manifold_metrics(real, fake, K)
    assert m["precision"] == 1.0
    assert m["recall"] <= 1 / 300                        # at most that one real point
    assert m["coverage"] < 0.05                           # the few real balls around that point


def test_half_of_the_modes_gives_half_the_recall():
    """Against a sample of the same 16-mode distribution (its own finite-sample figures):
    a generator with only 8 of the modes keeps the precision and halves the recall.
    Each figure is a share of 640 points (sd <= 0.02); the tolerance is 3 sd."""
    centres = torch.eye(16, dtype=torch.float64) * 50                     # 16 far-apart modes

    def draw(modes, per_mode):
        return centres[:modes].repeat_interleave(per_mode, 0) + torch.randn(modes * per_mode, 16, dtype=torch.float64)
    real = draw(16, 40)
    full, half = manifold_metrics(real, draw(16, 40), K), manifold_metrics(real, draw(8, 80), K)
    assert half["precision"] == pytest.approx(full["precision"], abs=0.06)
    assert half["recall"] == pytest.approx(full["recall"] / 2, abs=0.06)
    assert half["coverage"] == pytest.approx(full["coverage"] / 2, abs=0.06)


# -- FD against the closed form -----------------------------------------------------------------

def _with_moments(n: int, mean: torch.Tensor, var: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """n samples whose sample mean is exactly ``mean`` and sample covariance exactly R diag(var) R^T."""
    z = torch.randn(n, len(mean), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T     # sample covariance I
    return (z * var.sqrt()) @ rot.T + mean


@pytest.mark.parametrize("space", [*ev.HEADLINE_FEATURES, ev.VALIDATION_FEATURES], ids=os.path.basename)
def test_fd_matches_the_gaussian_closed_form_in_each_feature_space(space):
    """Two Gaussians with commuting covariances R diag(a) R^T, R diag(b) R^T at the feature
    size of each shipped space: FD = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2."""
    dim = json.load(open(os.path.join(space, "config.json")))["model"]["features"]
    g = torch.Generator().manual_seed(dim)
    rot = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
    mu1, mu2 = torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)
    a, b = torch.rand(dim, generator=g, dtype=torch.float64) + 0.1, torch.rand(dim, generator=g, dtype=torch.float64) * 3
    expect = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    f1, f2 = _with_moments(4 * dim, mu1, a, rot), _with_moments(4 * dim, mu2, b, rot)
    assert frechet_distance(f1, f2) == pytest.approx(expect, rel=1e-8)
    assert frechet_distance(f2, f1) == pytest.approx(expect, rel=1e-8)


def test_fd_of_plain_gaussian_samples_converges_to_the_closed_form():
    """Independent draws (no moment matching), diagonal covariances, 200k samples in 4-d:
    the estimate's error is O(sqrt(d / N)) ~ 0.005 of the terms; 0.03 leaves margin."""
    mu1, mu2 = torch.tensor([0.0, 1.0, -1.0, 0.5]), torch.tensor([0.5, 1.0, 0.0, 0.0])
    a, b = torch.tensor([1.0, 0.25, 4.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 0.09])
    expect = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())     # 3.33
    f1 = torch.randn(200_000, 4, dtype=torch.float64) * a.sqrt() + mu1
    f2 = torch.randn(200_000, 4, dtype=torch.float64) * b.sqrt() + mu2
    assert frechet_distance(f1, f2) == pytest.approx(expect, abs=0.03)


# -- diversity and pixel statistics ---------------------------------------------------------------

def test_mean_pairwise_distance_against_a_loop():
    f = torch.randn(12, 5, dtype=torch.float64)
    pairs = [float((f[i] - f[j]).norm()) for i in range(12) for j in range(12) if i != j]
    assert mean_pairwise_distance(f) == pytest.approx(sum(pairs) / len(pairs), rel=1e-12)
    assert math.isnan(mean_pairwise_distance(f[:1]))


def test_class_diversity_known_ratios():
    real = torch.randn(90, 8, dtype=torch.float64)
    labels = torch.arange(90) % 3
    gen = real.clone()
    gen[labels == 1] *= 0.5                               # class 1 half as spread out: 0.5
    gen[labels == 2] = real[2]                            # class 2 collapsed to one image: 0
    assert class_diversity(gen, labels, real, labels, 3) == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    one = torch.tensor([0, 1, 1, 2, 2])                   # class 0 has a single sample: no figure
    assert class_diversity(gen[:5], one, real, labels, 3)[0] is None


def test_pixel_stats_known_answers():
    x = torch.full((2, 1, 4, 4), -1.0)
    x[0, 0, 0, :] = 1.0                                   # image 0: 4 ink pixels at 1, 4 mid-tones at 0
    x[0, 0, 1, :] = 0.0
    x[1] = -0.5                                           # image 1: all grey: background -0.5, all mid-tone
    s = pixel_stats(x)
    assert s["background"] == pytest.approx((-1.0 + -0.5) / 2)
    assert s["midtone_share"] == pytest.approx((4 + 16) / 32)
    assert s["stroke"] == pytest.approx((4 * 1.0 + 4 * 0.0 + 16 * -0.5) / 24)
    assert pixel_stats(torch.full((1, 1, 4, 4), -1.0))["stroke"] is None


@pytest.fixture(scope="module")
def mnist_eval_split():
    return fdata.split(fdata.load("mnist"), "eval")[0]


def test_pixel_stats_of_real_mnist(mnist_eval_split):
    s = pixel_stats(user_images(mnist_eval_split))
    assert s["background"] == -1.0
    assert 0.08 < s["midtone_share"] < 0.10 and 0.4 < s["stroke"] < 0.55


def test_user_images_are_clamped_8_bit_values(mnist_eval_split):
    raw = torch.tensor([-1.7, -1.0, -0.5, 0.0, 0.3, 1.0, 2.0]).view(1, 1, 1, 7)
    u = user_images(raw)
    assert u.min() == -1 and u.max() == 1
    torch.testing.assert_close((u + 1) * 127.5, ((u + 1) * 127.5).round(), rtol=0, atol=1e-4)
    assert out_of_range_share(raw) == pytest.approx(2 / 7)
    assert torch.equal(user_images(mnist_eval_split), mnist_eval_split)     # real MNIST is 8-bit already


# -- feature networks -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_features_do_not_depend_on_the_rest_of_the_batch(arch):
    clf = Classifier(ClassifierConfig(arch=arch, size=16, width=8, features=16))
    clf.train()
    clf(torch.randn(32, 1, 16, 16))                       # moves batch-norm running statistics off their init
    clf.eval()
    x = torch.randn(10, 1, 16, 16)
    alone, _ = features_and_logits(clf, x[:3])
    together, _ = features_and_logits(clf, x)
    torch.testing.assert_close(alone, together[:3], rtol=1e-5, atol=1e-6)


def test_headline_spaces_are_independent_of_each_other_and_of_validation():
    loaded = [load_classifier(p) for p in (*ev.HEADLINE_FEATURES, ev.VALIDATION_FEATURES)]
    metas = [m for _, m in loaded[:-1]]
    assert len({clf.cfg.arch for clf, _ in loaded}) == 3                          # three architectures
    assert len({m["train_config"]["seed"] for _, m in loaded}) == 3               # three seeds
    assert any(m["train_config"].get("rotate", 0) > 0 for m in metas)             # one rotates, the others not
    assert all(m["data"] == "mnist" and m["eval_accuracy"] > 0.9 for m in metas)
    shas = {ev._weights_sha(p) for p in (*ev.HEADLINE_FEATURES, ev.VALIDATION_FEATURES)}
    assert len(shas) == 3
    for p in ev.HEADLINE_FEATURES:
        assert os.path.getsize(os.path.join(p, "model.safetensors")) < 1_000_000
        assert not ev.is_validation_space(p, ev.validation_path({}))
        assert ev.is_headline_space(p) and not ev.is_headline_space(ev.VALIDATION_FEATURES)


# -- tiny models for the protocol tests ------------------------------------------------------------

@pytest.fixture
def tiny_features(tmp_path):
    paths = []
    for seed, arch in ((1, "bncnn"), (2, "mlp")):
        torch.manual_seed(seed)
        p = str(tmp_path / f"feat-{arch}")
        save_classifier(Classifier(ClassifierConfig(arch=arch, size=16, width=8, features=16)).eval(), p,
                        {"data": "digits", "train_config": {"seed": seed}})
        paths.append(p)
    return paths


@pytest.fixture
def tiny_validation_classifier(tmp_path):
    torch.manual_seed(3)
    p = str(tmp_path / "val-clf")
    save_classifier(Classifier(ClassifierConfig(size=16, width=4, features=16)).eval(), p, {"data": "digits"})
    return p


def _record_splits(monkeypatch):
    seen = []
    real_split = fdata.split
    monkeypatch.setattr(fdata, "split", lambda ds, part: (seen.append(part), real_split(ds, part))[1])
    return seen


def test_validation_reads_only_the_train_split_and_a_non_headline_space(tiny_teacher, tiny_validation_classifier,
                                                                          tiny_features, monkeypatch):
    from flashcore.models import load_pretrained
    from flashcore.train.distill import DistillConfig, Validator
    seen = _record_splits(monkeypatch)
    model, meta = load_pretrained(tiny_teacher)
    cfg = DistillConfig(teacher=tiny_teacher, steps=2, val_samples=20, classifier=tiny_validation_classifier)
    v = Validator(cfg, meta)
    r = v(model)
    assert math.isfinite(r["fd"]) and seen and set(seen) == {"train"}
    assert 0.0 <= r["recall"] <= 1.0 and len(v.f_recall_ref) == cfg.val_samples
    # the same instrumentation does see eval's reference: it could catch a validator that read it
    seen.clear()
    ev.evaluate(tiny_teacher, tiny_features, steps=1, samples=20)
    assert "eval" in seen
    # distillation's default validation space is none of eval's headline spaces, and a headline
    # space is refused as a validation space
    default = DistillConfig().classifier
    assert os.path.realpath(os.path.join(ev._HOME, default)) == os.path.realpath(ev.VALIDATION_FEATURES)
    assert not ev.is_headline_space(ev.VALIDATION_FEATURES)
    with pytest.raises(ValueError, match="headline"):
        Validator(DistillConfig(teacher=tiny_teacher, classifier=ev.HEADLINE_FEATURES[0]), meta)


# -- eval on a tiny model ---------------------------------------------------------------------

def _png_cells(path: str, n: int, size: int, pad: int = 2, scale: int = 2) -> torch.Tensor:
    """The n images of a one-column grid PNG (``images.grid``, nearest-upscaled by ``scale``)."""
    from PIL import Image
    a = np.asarray(Image.open(path))[::scale, ::scale]
    cells = [a[pad + i * (size + pad): pad + i * (size + pad) + size, pad: pad + size] for i in range(n)]
    return torch.from_numpy(np.stack(cells)).unsqueeze(1)


def test_eval_scores_exactly_the_pixels_of_generates_png(tiny_teacher, tiny_features, tmp_path, monkeypatch):
    png = str(tmp_path / "grid.png")
    assert cli.main(["generate", "--model", tiny_teacher, "--steps", "2", "--per-class", "1", "--seed", "4",
                     "--out", png]) == 0
    scored = []
    real_features = ev.features_and_logits
    monkeypatch.setattr(ev, "features_and_logits", lambda clf, x: (scored.append(x), real_features(clf, x))[1])
    r = ev.evaluate(tiny_teacher, tiny_features, steps=2, samples=10, seed=4)
    png_pixels = _png_cells(png, 10, 16).float() / 127.5 - 1
    # each feature space scores the generated batch first, then the reference and the floor
    assert len(scored) == 6 and torch.equal(scored[0], png_pixels) and torch.equal(scored[3], png_pixels)
    assert r["raw_out_of_range"] > 0                      # the tiny model overshoots: the clamp mattered


def test_eval_json_has_every_figure_with_its_floor(tiny_teacher, tiny_features):
    r = ev.evaluate(tiny_teacher, tiny_features, steps=1, samples=400, k=3)
    assert r["reference"]["size"] < 400                   # more samples than the eval split holds
    assert r["floor"]["size"] == 400 and r["k"] == 3
    assert r["validation_space"]["path"] == "checkpoints/mnist-classifier"      # as a shipped JSON names it
    assert r["validation_space"]["sha256"] == ev._weights_sha(ev.VALIDATION_FEATURES)
    for name, s in r["feature_spaces"].items():
        assert not s["is_validation_space"]
        for m in ("fd", "precision", "recall", "density", "coverage", "accuracy", "diversity"):
            assert math.isfinite(s[m]) and math.isfinite(s[m + "_floor"]), m
        assert len(s["diversity_per_class"]) == 10
    for name in ("background", "midtone_share", "stroke"):
        assert set(r["pixels"][name]) == {"value", "real", "floor"}
    assert 0 <= r["raw_out_of_range"] <= 1
    json.dumps(r, allow_nan=False)


def test_eval_flags_or_refuses_the_validation_space(tmp_path, tiny_features, tiny_validation_classifier):
    """A student records the classifier that picked it: eval marks that space, and the CLI's
    setting refuses it."""
    torch.manual_seed(0)
    student = str(tmp_path / "student")
    save_pretrained(Denoiser(TINY_UNET), student, {
        "kind": "student", "guidance": None, "data": "digits", "steps": 1, "schedule": {"kind": "scaled_linear"},
        "distill_config": {"classifier": tiny_validation_classifier}})
    r = ev.evaluate(student, [tiny_features[0], tiny_validation_classifier], steps=1, samples=20)
    assert os.path.realpath(r["validation_space"]["path"]) == os.path.realpath(tiny_validation_classifier)
    flags = {n: s["is_validation_space"] for n, s in r["feature_spaces"].items()}
    assert flags == {"feat-bncnn": False, "val-clf": True}
    assert "VALIDATION SPACE" in ev.summary(r)
    with pytest.raises(ValueError, match="validation space"):
        ev.evaluate(student, [tiny_validation_classifier], steps=1, samples=20, refuse_validation_space=True)
    with pytest.raises(ValueError, match="k = 20"):
        ev.evaluate(student, tiny_features, steps=1, samples=20, k=20)
