import numpy as np
import pytest
import torch

from flashcore import data as fdata
from flashcore.metrics import Classifier, ClassifierConfig, blank_and_washed, frechet_distance, \
    load_classifier, save_classifier


def test_mnist_split_is_stratified_disjoint_and_fixed():
    ds = fdata.load("mnist")
    assert ds.images.shape == (5000, 1, 28, 28) and ds.images.min() == -1 and ds.images.max() == 1
    tr, ev = fdata.split_indices(ds.labels)
    assert len(set(tr.tolist()) & set(ev.tolist())) == 0 and len(tr) + len(ev) == 5000
    assert torch.equal(ds.labels[ev].bincount(), torch.full((10,), 100))
    tr2, ev2 = fdata.split_indices(ds.labels)
    assert torch.equal(ev, ev2) and torch.equal(tr, tr2)


def test_digits():
    ds = fdata.load("digits")
    assert ds.shape == (1, 16, 16) and ds.num_classes == 10 and len(ds.images) == 1797


def test_folder_data_set(tmp_path):
    from PIL import Image
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((10, 12), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = fdata.load(f"folder:{tmp_path}", size=8)
    assert ds.classes == ["cat", "dog"] and ds.images.shape == (6, 1, 8, 8)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.images[0].eq(-1).all() and ds.images.max() <= 1


def test_bad_data_sets(tmp_path):
    with pytest.raises(ValueError, match="unknown data set"):
        fdata.load("cifar")
    with pytest.raises(ValueError, match="does not exist"):
        fdata.load(f"folder:{tmp_path}/nope")
    with pytest.raises(ValueError, match="no class sub-folders"):
        fdata.load(f"folder:{tmp_path}")
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no images"):
        fdata.load(f"folder:{tmp_path}")


def test_frechet_distance_closed_form():
    f1 = torch.randn(500, 16, dtype=torch.float64)
    assert frechet_distance(f1, f1) == pytest.approx(0.0, abs=1e-6)
    # affine copy: S2 = c^2 S1, so FD = |mu1 - mu2|^2 + (1 - c)^2 Tr(S1)
    c, m = 1.7, torch.linspace(-1, 1, 16, dtype=torch.float64)
    f2 = c * f1 + m
    expect = (f1.mean(0) - f2.mean(0)).square().sum() + (1 - c) ** 2 * torch.cov(f1.T).trace()
    assert frechet_distance(f1, f2) == pytest.approx(expect.item(), rel=1e-6)
    assert frechet_distance(f2, f1) == pytest.approx(expect.item(), rel=1e-6)


def test_blank_and_washed():
    x = -torch.ones(4, 1, 10, 10)
    x[0, :, 2:8, 4:6] = 1.0                 # a stroke: not blank, black background
    x[2] = -0.5                             # grey, no ink: blank and washed
    blank, washed = blank_and_washed(x)
    assert blank == 0.75 and washed == 0.25


def test_classifier_round_trip(tmp_path):
    torch.manual_seed(0)
    clf = Classifier(ClassifierConfig(size=16)).eval()
    save_classifier(clf, str(tmp_path / "c"), {"data": "digits"})
    back, meta = load_classifier(str(tmp_path / "c"))
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(back(x), clf(x), rtol=0, atol=0)
    assert meta["kind"] == "classifier"
