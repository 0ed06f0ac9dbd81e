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


@pytest.mark.parametrize("arch", ["cnn", "bncnn", "mlp"])
def test_classifier_round_trip(tmp_path, arch):
    torch.manual_seed(0)
    clf = Classifier(ClassifierConfig(size=16, arch=arch))
    clf(torch.randn(8, 1, 16, 16))              # train mode: batch-norm statistics move off their init
    clf.eval()
    save_classifier(clf, str(tmp_path / "c"), {"data": "digits"})
    back, meta = load_classifier(str(tmp_path / "c"))
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(back(x), clf(x), rtol=0, atol=0)
    assert meta["kind"] == "classifier" and back.cfg.arch == arch


def test_a_classifier_saved_before_architectures_loads_as_the_cnn(tmp_path):
    import json
    torch.manual_seed(0)
    save_classifier(Classifier(ClassifierConfig(size=16)), str(tmp_path / "c"), {"data": "digits"})
    cfg = json.load(open(tmp_path / "c" / "config.json"))
    del cfg["model"]["arch"]                    # as checkpoints/mnist-classifier was written
    json.dump(cfg, open(tmp_path / "c" / "config.json", "w"))
    assert load_classifier(str(tmp_path / "c"))[0].cfg.arch == "cnn"


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture 'vit'"):
        Classifier(ClassifierConfig(arch="vit"))


def test_train_classifier_rotation_keeps_the_background(tmp_path):
    from flashcore.train.classifier import ClassifierTrainConfig, augment
    x = -torch.ones(4, 1, 16, 16)
    x[:, :, 6:10, 6:10] = 1.0
    g = torch.Generator().manual_seed(0)
    y = augment(x, ClassifierTrainConfig(rotate=15.0, shift=2), g)
    assert y.shape == x.shape and y.min() >= -1 - 1e-6 and y.max() <= 1 + 1e-6
    assert (y[:, :, 0, :] == -1).all() and (y[:, :, :, 0] == -1).all()   # border filled with background
    assert not torch.equal(y[0], y[1])                                   # a draw per image


@pytest.mark.parametrize("arch,rotate", [("bncnn", 10.0), ("mlp", 0.0)])
def test_train_classifier_each_architecture(tmp_path, arch, rotate):
    from flashcore.train.classifier import ClassifierTrainConfig, train_classifier
    """One short epoch: the loop runs for the architecture, and its config is saved (learning
    itself is measured by the shipped networks' eval accuracy, docs/evaluation.md)."""
    cfg = ClassifierTrainConfig(data="digits", arch=arch, epochs=1, batch_size=256, width=8, features=16,
                                rotate=rotate, seed=1)
    meta = train_classifier(cfg, str(tmp_path / "c"), progress=False)
    clf, back = load_classifier(str(tmp_path / "c"))
    assert clf.cfg.arch == arch and clf.cfg.width == 8 and clf.cfg.features == 16
    assert back["train_config"]["rotate"] == rotate and back["train_config"]["seed"] == 1
    assert 0 <= meta["eval_accuracy"] <= 1 and meta["parameters"] == sum(p.numel() for p in clf.parameters())
