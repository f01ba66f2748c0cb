"""`hf-medbeit train` on bad data files and folders: one line about the real problem, exit 2,
no run folder and no cache entry; and never a cache built from another file."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from hf_medbeit.data import load_medmnist

from conftest import (
    BREASTMNIST_MD5, DATA, TINY_BEIT, assert_nothing_written, assert_one_line_error, run_cli, write_medmnist_npz,
)

pytestmark = pytest.mark.e2e


def train_args(root, out, cache, *extra):
    return (
        "train", "--data_dir", str(root), "--dataset_cache_dir", str(cache), "--output_dir", str(out),
        "--model_type", "beit", "--config_overrides", TINY_BEIT, "--max_steps", "1", "--report_to", "none", "--explain_per_class", "0", *extra,
    )


def own_breastmnist(tmp_path, counts=(8, 4, 4), **changes):
    """A folder with a BreastMNIST-format file of your own, with some arrays replaced (None drops one)."""
    root = tmp_path / "own"
    path = write_medmnist_npz(root / "breastmnist.npz", "breastmnist", counts=counts)
    arrays = dict(np.load(path, allow_pickle=False))
    for name, value in changes.items():
        if value is None:
            del arrays[name]
        else:
            arrays[name] = value(arrays[name]) if callable(value) else value
    np.savez_compressed(path, **arrays)
    return root


# --- The cache is keyed on the file actually given ------------------------------------------


@pytest.fixture
def official_cache(tmp_path):
    """A dataset cache that already holds the official BreastMNIST, converted from a copy of it."""
    root = tmp_path / "official"
    root.mkdir()
    shutil.copy(DATA / "breastmnist.npz", root / "breastmnist.npz")
    cache = tmp_path / "cache"
    _, _, md5 = load_medmnist("breastmnist", data_dir=root, cache_dir=cache)
    assert md5 == BREASTMNIST_MD5
    return root, cache


def modified_copy(official_root, tmp_path):
    root = tmp_path / "modified"
    root.mkdir()
    arrays = dict(np.load(official_root / "breastmnist.npz", allow_pickle=False))
    arrays["train_labels"][0] = 1 - arrays["train_labels"][0]  # one label edited
    np.savez_compressed(root / "breastmnist.npz", **arrays)
    return root


def other_folder(official_root, tmp_path):
    return write_medmnist_npz(tmp_path / "other" / "breastmnist.npz", "breastmnist").parent


def missing_folder(official_root, tmp_path):
    return tmp_path / "nowhere"


def plain_file(official_root, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a folder\n")
    return path


@pytest.mark.parametrize("given,fragments", [
    (modified_copy, ("has MD5", f"medmnist.INFO expects {BREASTMNIST_MD5}")),
    (other_folder, ("has MD5", f"medmnist.INFO expects {BREASTMNIST_MD5}")),
    (missing_folder, ("breastmnist.npz not found in",)),
    (plain_file, ("is a file, not a folder",)),
], ids=["modified file", "another folder", "missing folder", "plain file"])
def test_a_cached_official_file_is_never_used_in_place_of_the_file_given(tmp_path, official_cache, given, fragments):
    official_root, cache = official_cache
    before = sorted(p.name for p in cache.iterdir())
    root = given(official_root, tmp_path)
    out = tmp_path / "out"
    line = assert_one_line_error(run_cli(*train_args(root, out, cache)), *fragments)
    assert str(root) in line
    assert not out.exists()
    assert sorted(p.name for p in cache.iterdir()) == before, "no new cache entry, no staging folder left"


# --- Folders and files that cannot be read --------------------------------------------------


@pytest.mark.parametrize("download", [False, True])
def test_data_dir_that_is_a_file_is_named_as_a_file(tmp_path, download):
    # With --download the old code got as far as mkdir (FileExistsError); nothing is fetched now.
    plain = tmp_path / "breastmnist.npz"
    shutil.copy(DATA / "breastmnist.npz", plain)
    out, cache = tmp_path / "out", tmp_path / "cache"
    extra = ("--download", "true") if download else ()
    assert_one_line_error(run_cli(*train_args(plain, out, cache, *extra)),
                          f"--data_dir {plain} is a file, not a folder", "pass the folder")
    assert_nothing_written(out, cache)


def test_a_folder_where_the_data_file_should_be_is_reported_with_the_os_reason(tmp_path):
    root = tmp_path / "root"
    (root / "breastmnist.npz").mkdir(parents=True)
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert_one_line_error(run_cli(*train_args(root, out, cache)),
                          f"cannot read {root / 'breastmnist.npz'}: Is a directory")
    assert_nothing_written(out, cache)


# --- Files in the wrong format: advice about the file, never "download it again" ----------


@pytest.mark.parametrize("bad_value,shown", [(0.5, "0.5"), (np.nan, "nan")])
def test_labels_that_are_not_whole_class_indices_are_refused(tmp_path, bad_value, shown):
    def with_bad_row(labels):
        labels = labels.astype(np.float64)
        labels[5, 0] = bad_value
        return labels

    root = own_breastmnist(tmp_path, train_labels=with_bad_row)
    out, cache = tmp_path / "out", tmp_path / "cache"
    line = assert_one_line_error(run_cli(*train_args(root, out, cache, "--skip_md5_check", "true")),
                                 f"train_labels[5] = [{shown}] is not a whole number", "labels must be whole class indices")
    assert "download" not in line
    assert_nothing_written(out, cache)


@pytest.mark.parametrize("changes,fragments", [
    ({"val_images": None, "val_labels": None}, ("has no val_images, val_labels", "train_images, train_labels, val_images")),
    ({"test_images": lambda a: a[:0], "test_labels": lambda a: a[:0]}, ("the test split is empty", "test_images has 0 rows")),
], ids=["missing split", "empty split"])
def test_a_missing_or_empty_split_is_named_with_what_the_format_needs(tmp_path, changes, fragments):
    root = own_breastmnist(tmp_path, **changes)
    out, cache = tmp_path / "out", tmp_path / "cache"
    line = assert_one_line_error(run_cli(*train_args(root, out, cache, "--skip_md5_check", "true")), *fragments)
    assert "download" not in line
    assert_nothing_written(out, cache)


def test_gray_images_with_a_channel_axis_are_told_to_squeeze_it(tmp_path):
    root = own_breastmnist(tmp_path, val_images=lambda a: a[..., None])
    out, cache = tmp_path / "out", tmp_path / "cache"
    line = assert_one_line_error(run_cli(*train_args(root, out, cache, "--skip_md5_check", "true")),
                                 "val_images has shape (4, 28, 28, 1)", "channel axis of size 1",
                                 "(N, 28, 28)", "squeeze the last axis")
    assert "--size" not in line
    assert_nothing_written(out, cache)


# --- Balancing -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["undersample", "oversample"])
def test_resampling_names_a_class_absent_from_the_training_split(tmp_path, method):
    root = own_breastmnist(tmp_path, train_labels=lambda a: np.ones_like(a))  # no malignant (class 0)
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert_one_line_error(run_cli(*train_args(root, out, cache, "--skip_md5_check", "true", "--balancing", method)),
                          "the training split has no example of malignant", f"cannot {method}", "--balancing none")
    # The data itself is fine, so its cache entry may stay; the run folder must not exist.
    assert not out.exists()
