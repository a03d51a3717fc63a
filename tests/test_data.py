"""Data sets: documented shapes, fixed stratified splits, MNIST-1D generated offline and cached, teacher–student."""

import random
import socket

import numpy as np
import pytest
import torch

import flows
from flows.data import digits, mnist1d, teacher_student


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    for name in ("socket", "create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, refuse)


def _class_counts(labels):
    return torch.bincount(labels, minlength=10)


def test_mnist1d_is_offline_deterministic_documented_and_cached(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    monkeypatch.setenv("FLOWS_CACHE_DIR", str(tmp_path))
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002 - checking it is left alone
    x, y = mnist1d(cache=False)
    assert random.getstate() == py_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state))  # noqa: NPY002
    assert not list(tmp_path.iterdir())  # cache=False writes nothing
    # the first cached call generates again (same data), writes one file atomically, later calls read it
    again, labels_again = mnist1d()
    assert torch.equal(again, x) and torch.equal(labels_again, y)
    assert [p.name for p in tmp_path.iterdir()] == ["mnist1d-seed42.npz"]
    x_test, y_test = mnist1d(split="test")

    assert x.shape == (4000, 40) and y.shape == (4000,) and x.dtype == torch.float64 and y.dtype == torch.long
    assert x_test.shape == (1000, 40) and y_test.shape == (1000,)
    for labels in (y, y_test):
        assert int(labels.min()) == 0 and int(labels.max()) == 9 and bool((_class_counts(labels) > 0).all())
    # 500 sequences per class in all; standardised over all 5 000 sequences to mean 0 and standard deviation 1
    assert _class_counts(torch.cat([y, y_test])).tolist() == [500] * 10
    both = torch.cat([x, x_test])
    assert abs(float(both.mean())) < 1e-12 and abs(float(both.std(correction=0)) - 1) < 1e-12

    cached_test, cached_labels = mnist1d(split="test", channel=True)
    assert cached_test.shape == (1000, 1, 40) and torch.equal(cached_test[:, 0], x_test)
    assert torch.equal(cached_labels, y_test)
    assert mnist1d(split="test", dtype=torch.float32)[0].dtype == torch.float32

    # a damaged cache file is regenerated and replaced
    (tmp_path / "mnist1d-seed42.npz").write_bytes(b"not an npz file")
    repaired, _ = mnist1d()
    assert torch.equal(repaired, x)
    assert [p.name for p in tmp_path.iterdir()] == ["mnist1d-seed42.npz"]
    assert torch.equal(mnist1d()[0], x)

    other, _ = mnist1d(seed=0, cache=False)
    assert other.shape == x.shape and not torch.equal(other, x)


def test_mnist1d_refuses_an_unknown_split():
    with pytest.raises(ValueError, match="'valid'"):
        mnist1d(split="valid", cache=False)


def test_digits_splits_are_disjoint_stratified_and_fixed():
    x, y = digits()
    x_train, y_train = digits(split="train")
    x_test, y_test = digits(split="test")
    assert x.shape == (1797, 64) and x_train.shape == (1347, 64) and x_test.shape == (450, 64)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # no image is in both splits (the 1 797 digits are distinct, so rows identify samples) ...
    assert len(torch.unique(x, dim=0)) == 1797
    assert not bool((x_train[:, None, :] == x_test[None, :, :]).all(-1).any())
    # ... and together they are the whole set, each image with its own label
    rows = torch.cat([torch.cat([x_train, y_train[:, None].double()], 1),
                      torch.cat([x_test, y_test[:, None].double()], 1)])
    full = torch.cat([x, y[:, None].double()], 1)
    assert torch.equal(torch.unique(rows, dim=0), torch.unique(full, dim=0))
    # stratified: each class sends round(¼ n_c) of its samples to the test set
    per_class = _class_counts(y)
    assert _class_counts(y_test).tolist() == [round(0.25 * int(c)) for c in per_class]
    assert (_class_counts(y_train) + _class_counts(y_test)).tolist() == per_class.tolist()
    half, half_labels = digits(split="test", test_fraction=0.5)
    assert _class_counts(half_labels).tolist() == [round(0.5 * int(c)) for c in per_class]
    # the split does not depend on the seed; a seeded subset of n samples is drawn from within the split
    assert torch.equal(digits(split="test", seed=7)[0], x_test)
    sub, sub_labels = digits(100, split="train", seed=3)
    assert sub.shape == (100, 64)
    match = (sub[:, None, :] == x_train[None, :, :]).all(-1)
    assert bool((match.sum(1) == 1).all())
    assert torch.equal(sub_labels, y_train[match.float().argmax(1)])
    assert not torch.equal(sub, digits(100, split="train", seed=4)[0])
    images, image_labels = digits(split="train", images=True)
    assert images.shape == (1347, 1, 8, 8) and torch.equal(images.reshape(-1, 64), x_train)
    assert torch.equal(image_labels, y_train)


@pytest.mark.parametrize("kwargs, needle", [
    ({"split": "validation"}, "split"),
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"n": 0}, "n must be"),
    ({"n": 451, "split": "test"}, "451"),
])
def test_digits_refuses_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        digits(**kwargs)


def test_teacher_student_test_set_comes_from_the_same_teacher():
    sizes = (4, 6, 3)
    x, y = teacher_student(200, sizes, seed=5)
    x_test, y_test = teacher_student(200, sizes, seed=5, split="test", n_test=150)
    assert x.shape == (200, 4) and y.shape == (200, 3) and x_test.shape == (150, 4) and y_test.shape == (150, 3)
    assert torch.equal(teacher_student(200, sizes, seed=5, split="train")[0], x)
    # the documented teacher: mlp(sizes, seed=seed + 1) with every parameter doubled
    teacher = flows.data.mlp(list(sizes), seed=6)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(2.0)
        assert torch.allclose(teacher(x), y, rtol=0, atol=1e-12)
        assert torch.allclose(teacher(x_test), y_test, rtol=0, atol=1e-12)
    # fresh inputs, not a subset of the training ones; another seed is another teacher
    assert not bool((x_test[:, None, :] == x[None, :, :]).all(-1).any())
    x_other, y_other = teacher_student(200, sizes, seed=9)
    with torch.no_grad():
        assert not torch.allclose(teacher(x_other), y_other, atol=1e-3)


def test_teacher_student_noise_has_the_stated_scale():
    sizes, noise, m = (3, 5, 2), 0.1, 4000
    x_test, y_test = teacher_student(10, sizes, seed=1, noise=noise, split="test", n_test=m)
    teacher = flows.data.mlp(list(sizes), seed=2)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(2.0)
        residual = y_test - teacher(x_test)
    # m·2 i.i.d. N(0, noise²) draws: the sample standard deviation is within ±4/√(2·8000) of noise (relative)
    assert abs(float(residual.std()) / noise - 1) < 4 / (2 * residual.numel()) ** 0.5
    assert abs(float(residual.mean())) < 4 * noise / residual.numel() ** 0.5
    with pytest.raises(ValueError, match="n_test"):
        teacher_student(10, sizes, split="test", n_test=0)
    with pytest.raises(ValueError, match="split"):
        teacher_student(10, sizes, split="dev")


def test_mnist1d_still_returns_the_data_when_the_cache_cannot_be_written(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FLOWS_CACHE_DIR", str(blocker / "cache"))  # a folder below a file cannot be created
    with pytest.warns(UserWarning, match="could not cache MNIST-1D"):
        x, y = mnist1d(split="test")
    assert x.shape == (1000, 40) and y.shape == (1000,)
