"""MedMNIST .npz -> DatasetDict: every 2D data set, two sizes, the official file, balancing."""

from __future__ import annotations

import numpy as np
import pytest
from medmnist import INFO

from hf_medbeit.data import (
    available_sizes, class_weights, file_md5, flags_2d, get_spec, label_array, load_medmnist, resample,
)
from hf_medbeit.errors import UserError

from conftest import BREASTMNIST_MD5, DATA, npz_name


def test_all_twelve_2d_sets_come_from_info():
    assert len(flags_2d()) == 12
    assert "breastmnist" in flags_2d() and "organmnist3d" not in flags_2d()
    assert available_sizes("breastmnist") == [28, 64, 128, 224]


@pytest.mark.parametrize("flag", sorted(f for f in INFO if not INFO[f]["python_class"].endswith("3D")))
def test_every_2d_set_converts_with_class_names(flag, synthetic_root, cache_dir):
    root = synthetic_root(flag, 28, counts=(12, 4, 6))
    dataset, spec, _ = load_medmnist(flag, 28, data_dir=root, verify_md5=False, cache_dir=cache_dir)
    assert list(dataset) == ["train", "validation", "test"]
    assert [len(dataset[s]) for s in dataset] == [12, 4, 6]
    names = [INFO[flag]["label"][str(i)] for i in range(len(INFO[flag]["label"]))]
    label_feature = dataset["train"].features["label"]
    if spec.is_multi_label:
        assert flag == "chestmnist" and len(names) == 14
        assert label_feature.length == 14
        assert np.asarray(dataset["train"][0]["label"]).shape == (14,)
    else:
        assert label_feature.names == names
    image = dataset["train"][0]["image"]
    assert image.size == (28, 28)
    assert image.mode == ("L" if INFO[flag]["n_channels"] == 1 else "RGB")
    assert spec.task == INFO[flag]["task"]


@pytest.mark.parametrize("flag,size", [("pneumoniamnist", 64), ("bloodmnist", 128), ("chestmnist", 64)])
def test_larger_sizes_use_medmnist_file_names(flag, size, synthetic_root, cache_dir):
    root = synthetic_root(flag, size, counts=(6, 2, 3))
    assert (root / npz_name(flag, size)).exists()
    dataset, spec, _ = load_medmnist(flag, size, data_dir=root, verify_md5=False, cache_dir=cache_dir)
    assert dataset["test"][0]["image"].size == (size, size)
    assert spec.filename == f"{flag}_{size}.npz"


def test_official_breastmnist_matches_the_raw_arrays(cache_dir):
    dataset, spec, md5 = load_medmnist("breastmnist", 28, data_dir=DATA, cache_dir=cache_dir)
    assert md5 == BREASTMNIST_MD5 == spec.md5
    raw = np.load(DATA / "breastmnist.npz", allow_pickle=False)
    for split, prefix in (("train", "train"), ("validation", "val"), ("test", "test")):
        assert len(dataset[split]) == len(raw[f"{prefix}_images"])
        np.testing.assert_array_equal(label_array(dataset[split]), raw[f"{prefix}_labels"][:, 0])
    for index in (0, 77, 155):
        np.testing.assert_array_equal(np.asarray(dataset["test"][index]["image"]), raw["test_images"][index])
    assert dataset["train"].features["label"].names == ["malignant", "normal, benign"]
    assert dataset["train"].info.license == "CC BY 4.0"


def test_second_load_comes_from_the_cache(breast_root, cache_dir, monkeypatch):
    import hf_medbeit.data as data

    load_medmnist("breastmnist", 28, data_dir=breast_root, cache_dir=cache_dir)

    def no_conversion(*args, **kwargs):
        raise AssertionError("the second load must come from the cache")

    monkeypatch.setattr(data, "_convert", no_conversion)
    dataset, _, md5 = load_medmnist("breastmnist", 28, data_dir=breast_root, cache_dir=cache_dir)
    assert len(dataset["train"]) == 546 and md5 == BREASTMNIST_MD5
    assert [p.name for p in cache_dir.iterdir()] == [f"breastmnist_28_{BREASTMNIST_MD5}_v1"], "one entry, no staging folder"


def test_the_cache_is_keyed_on_the_file_given_not_on_the_expected_md5(breast_root, cache_dir, synthetic_root):
    load_medmnist("breastmnist", 28, data_dir=breast_root, cache_dir=cache_dir)
    own = synthetic_root("breastmnist", 28, counts=(10, 4, 6))
    dataset, _, md5 = load_medmnist("breastmnist", 28, data_dir=own, verify_md5=False, cache_dir=cache_dir)
    assert md5 == file_md5(own / "breastmnist.npz") != BREASTMNIST_MD5
    assert [len(dataset[s]) for s in dataset] == [10, 4, 6]  # the own file, not the cached official one
    with pytest.raises(UserError, match=f"has MD5 {md5} but medmnist.INFO expects {BREASTMNIST_MD5}"):
        load_medmnist("breastmnist", 28, data_dir=own, cache_dir=cache_dir)  # cached, but not official
    (breast_root / "breastmnist.npz").unlink()
    with pytest.raises(UserError, match="breastmnist.npz not found in"):
        load_medmnist("breastmnist", 28, data_dir=breast_root, cache_dir=cache_dir)
    assert len(list(cache_dir.iterdir())) == 2


def test_an_unreadable_data_file_is_one_line_with_the_os_reason(breast_root, cache_dir, monkeypatch):
    # The tests run as root, for whom chmod does not stop reads: the opener refuses instead.
    import hf_medbeit.data as data

    path = breast_root / "breastmnist.npz"

    def refuse(file):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(data, "file_md5", refuse)
    with pytest.raises(UserError) as error:
        load_medmnist("breastmnist", 28, data_dir=breast_root, cache_dir=cache_dir)
    assert str(error.value).startswith(f"cannot read {path}: Permission denied; ")
    assert "\n" not in str(error.value) and "check its permissions" in str(error.value)
    assert not cache_dir.exists()


def test_float_labels_holding_whole_numbers_are_accepted(synthetic_root, cache_dir):
    root = synthetic_root("bloodmnist", 28, counts=(16, 8, 8))
    path = root / "bloodmnist.npz"
    arrays = dict(np.load(path, allow_pickle=False))
    expected = arrays["train_labels"][:, 0].copy()
    arrays["train_labels"] = arrays["train_labels"].astype(np.float32)
    np.savez_compressed(path, **arrays)
    dataset, _, _ = load_medmnist("bloodmnist", 28, data_dir=root, verify_md5=False, cache_dir=cache_dir)
    np.testing.assert_array_equal(label_array(dataset["train"]), expected)


@pytest.mark.parametrize("bad", [0.5, np.nan, np.inf])
def test_multi_label_values_that_are_not_whole_numbers_are_refused(synthetic_root, cache_dir, bad):
    root = synthetic_root("chestmnist", 28, counts=(8, 4, 4))
    path = root / "chestmnist.npz"
    arrays = dict(np.load(path, allow_pickle=False))
    arrays["val_labels"] = arrays["val_labels"].astype(np.float64)
    arrays["val_labels"][2, 3] = bad
    np.savez_compressed(path, **arrays)
    with pytest.raises(UserError, match=r"val_labels\[2\] = .* is not a whole number; labels must be whole class indices"):
        load_medmnist("chestmnist", 28, data_dir=root, verify_md5=False, cache_dir=cache_dir)


def test_channels_first_images_are_told_to_move_the_axis(synthetic_root, cache_dir):
    root = synthetic_root("bloodmnist", 28, counts=(8, 4, 4))
    path = root / "bloodmnist.npz"
    arrays = dict(np.load(path, allow_pickle=False))
    arrays["test_images"] = np.moveaxis(arrays["test_images"], -1, 1)
    np.savez_compressed(path, **arrays)
    with pytest.raises(UserError, match=r"test_images has shape \(4, 3, 28, 28\): channels first .* move the channel axis last"):
        load_medmnist("bloodmnist", 28, data_dir=root, verify_md5=False, cache_dir=cache_dir)


def test_a_real_size_mismatch_keeps_the_size_advice(synthetic_root, cache_dir):
    root = synthetic_root("breastmnist", 64, counts=(4, 2, 2))
    (root / "breastmnist_64.npz").rename(root / "breastmnist.npz")
    with pytest.raises(UserError, match=r"train_images has shape \(4, 64, 64\), expected \(N, 28, 28\[, 3\]\).*--size"):
        load_medmnist("breastmnist", 28, data_dir=root, verify_md5=False, cache_dir=cache_dir)


def test_conversion_streams_in_chunks(monkeypatch, synthetic_root, cache_dir):
    """Arrays are read a chunk of rows at a time, never whole."""
    import hf_medbeit.data as data

    monkeypatch.setattr(data, "CHUNK_ROWS", 5)
    seen = []
    original = data._NpyMember.iter_chunks

    def spy(self, rows=None, **kwargs):
        for chunk in original(self, 5, **kwargs):
            seen.append(len(chunk))
            yield chunk

    monkeypatch.setattr(data._NpyMember, "iter_chunks", spy)
    root = synthetic_root("dermamnist", 28, counts=(23, 4, 6))
    dataset, _, _ = load_medmnist("dermamnist", 28, data_dir=root, verify_md5=False, cache_dir=cache_dir)
    assert len(dataset["train"]) == 23
    assert max(seen) == 5


def test_parallel_conversion_gives_the_same_rows_in_order(monkeypatch, synthetic_root, tmp_path):
    import hf_medbeit.data as data

    monkeypatch.setattr(data, "CHUNK_ROWS", 5)  # so that 23 rows make several ranges
    assert data._row_ranges(23, 3) == [[0, 7], [7, 15], [15, 23]] and data._row_ranges(23, None) == [[0, 23]]
    assert data._row_ranges(8, 4) == [[0, 8]]  # under two chunks: not worth a second process
    root = synthetic_root("dermamnist", 28, counts=(23, 4, 12))
    raw = np.load(root / "dermamnist.npz", allow_pickle=False)
    serial, _, _ = load_medmnist("dermamnist", data_dir=root, verify_md5=False, cache_dir=tmp_path / "serial")
    parallel, _, _ = load_medmnist("dermamnist", data_dir=root, verify_md5=False, cache_dir=tmp_path / "parallel",
                                   num_proc=3)
    for split, prefix in (("train", "train"), ("validation", "val"), ("test", "test")):
        for dataset in (serial, parallel):
            images = np.stack([np.asarray(image) for image in dataset[split]["image"]])
            np.testing.assert_array_equal(images, raw[f"{prefix}_images"])
            np.testing.assert_array_equal(dataset[split]["label"], raw[f"{prefix}_labels"][:, 0])


def test_undersampling_to_the_study_ratio(cache_dir):
    dataset, spec, _ = load_medmnist("breastmnist", 28, data_dir=DATA, cache_dir=cache_dir)
    balanced = resample(dataset["train"], spec, "undersample", 0.6, seed=42)
    counts = np.bincount(label_array(balanced))
    assert counts.tolist() == [147, 220]  # all 147 malignant kept, benign cut to 60/40
    again = resample(dataset["train"], spec, "undersample", 0.6, seed=42)
    assert label_array(again).tolist() == label_array(balanced).tolist()
    assert np.bincount(label_array(resample(dataset["train"], spec, "undersample", 0.5, seed=0))).tolist() == [147, 147]


def test_oversampling_keeps_every_original(cache_dir):
    dataset, spec, _ = load_medmnist("breastmnist", 28, data_dir=DATA, cache_dir=cache_dir)
    grown = resample(dataset["train"], spec, "oversample", None, seed=1)
    assert np.bincount(label_array(grown)).tolist() == [399, 399]
    indices = np.asarray(grown._indices.column("indices")) if grown._indices is not None else None
    assert indices is not None and set(range(546)) <= set(indices.tolist())


def test_multiclass_resampling_equalises(synthetic_root, cache_dir):
    root = synthetic_root("bloodmnist", 28, counts=(40, 8, 8))
    dataset, spec, _ = load_medmnist("bloodmnist", 28, data_dir=root, verify_md5=False, cache_dir=cache_dir)
    under = resample(dataset["train"], spec, "undersample", None, seed=0)
    counts = np.bincount(label_array(under), minlength=8)
    assert len(set(counts.tolist())) == 1
    with pytest.raises(UserError, match="binary"):
        resample(dataset["train"], spec, "undersample", 0.6, seed=0)


def test_class_weights_are_sklearn_balanced():
    spec = get_spec("breastmnist")
    labels = np.array([0] * 147 + [1] * 399)
    weights = class_weights(labels, spec)
    np.testing.assert_allclose(weights, [546 / (2 * 147), 546 / (2 * 399)])
    assert np.isclose((weights[labels]).mean(), 1.0)


def test_multilabel_pos_weight():
    spec = get_spec("chestmnist")
    labels = np.zeros((10, 14), dtype=int)
    labels[:2] = 1
    np.testing.assert_allclose(class_weights(labels, spec), np.full(14, 8 / 2))
    with pytest.raises(UserError, match="multi-label"):
        resample(None, spec, "undersample", None, seed=0)
