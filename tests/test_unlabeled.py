"""The unlabelled-image corpus for pre-training (hf_medbeit.unlabeled): MedMNIST training splits,
.npz/.npy arrays and image folders, mixed, repeated, resized, one mode; every bad input is one
UserError line naming the problem and the fix."""

from __future__ import annotations

import logging
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from hf_medbeit.errors import UserError
from hf_medbeit.unlabeled import check_sources, load_unlabeled

from conftest import BREASTMNIST_MD5, DATA, write_medmnist_npz

LOGGER = "hf_medbeit.unlabeled"


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for the module, so the official BreastMNIST file is converted once."""
    return tmp_path_factory.mktemp("unlabeled_cache")


def images_of(corpus) -> np.ndarray:
    return np.asarray(corpus.dataset.select_columns(["image"]).with_format("numpy")[:]["image"])


def sources_of(corpus) -> np.ndarray:
    return np.asarray(corpus.dataset["source"])


def gray_stack(count: int, height: int = 28, width: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, height, width), dtype=np.uint8)


def write_pngs(folder, arrays, nested: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, array in enumerate(arrays):
        target = folder / ("deep" if nested and index % 2 else "") / f"img{index:03d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(target)
        paths.append(target)
    return paths


# --- Each kind of source ---------------------------------------------------------------------


def test_a_medmnist_flag_gives_exactly_its_training_images_and_no_labels(shared_cache):
    corpus = load_unlabeled(["breastmnist"], data_dir=str(DATA), cache_dir=shared_cache)
    official = np.load(DATA / "breastmnist.npz", allow_pickle=False)
    assert set(corpus.dataset.column_names) == {"image", "source"}
    assert np.array_equal(images_of(corpus), official["train_images"])
    (source,) = corpus.sources
    assert (source.name, source.kind, source.md5, source.images, source.used) == (
        "breastmnist", "medmnist", BREASTMNIST_MD5, 546, 546)
    assert source.path.endswith("breastmnist.npz")
    assert corpus.channels == 1 and corpus.dataset.features["image"].mode == "L"
    assert corpus.dataset.features["source"].names == ["breastmnist"]


def test_an_npz_in_medmnist_format_contributes_its_train_images_only_and_says_so(tmp_path, caplog):
    path = write_medmnist_npz(tmp_path / "own.npz", "breastmnist", counts=(12, 5, 6))
    arrays = np.load(path, allow_pickle=False)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        corpus = load_unlabeled([str(path)], cache_dir=tmp_path / "cache")
    images = images_of(corpus)
    assert np.array_equal(images, arrays["train_images"])
    held_out = np.concatenate([arrays["val_images"], arrays["test_images"]])
    assert not any((held_out == image).all(axis=(1, 2)).any() for image in images)
    assert corpus.sources[0].kind == "npz" and corpus.sources[0].array == "train_images"
    assert "val_images and test_images" in caplog.text and "left out" in caplog.text


def test_an_npz_with_one_array_or_an_images_array_is_read_whatever_else_it_holds(tmp_path):
    alone, named = gray_stack(5, seed=1), gray_stack(7, seed=2)
    np.savez(tmp_path / "alone.npz", scans=alone)
    np.savez_compressed(tmp_path / "named.npz", images=named, patient_ids=np.arange(7))
    corpus = load_unlabeled([str(tmp_path / "alone.npz"), str(tmp_path / "named.npz")], cache_dir=tmp_path / "cache")
    assert np.array_equal(images_of(corpus), np.concatenate([alone, named]))
    assert [s.array for s in corpus.sources] == ["scans", "images"]
    assert corpus.sources[0].md5 and corpus.sources[0].md5 != corpus.sources[1].md5


def test_an_npy_with_a_channel_axis_of_one_is_read_as_gray(tmp_path):
    images = gray_stack(6, seed=3)
    np.save(tmp_path / "scans.npy", images[..., None])
    corpus = load_unlabeled([str(tmp_path / "scans.npy")], cache_dir=tmp_path / "cache")
    assert corpus.channels == 1 and corpus.sources[0].kind == "npy"
    assert np.array_equal(images_of(corpus), images)


def test_a_folder_is_searched_recursively_for_images_and_other_files_are_ignored(tmp_path):
    images = gray_stack(4, seed=4)
    write_pngs(tmp_path / "scans", images, nested=True)
    (tmp_path / "scans" / "README.txt").write_text("not an image\n")
    sixteen_bit = np.full((28, 28), 4096, dtype=np.uint16)  # 16-bit scan: scaled 0..65535 -> 0..255
    Image.fromarray(sixteen_bit).save(tmp_path / "scans" / "deep" / "zz16.png")
    corpus = load_unlabeled([str(tmp_path / "scans")], cache_dir=tmp_path / "cache")
    source = corpus.sources[0]
    assert (source.kind, source.md5, source.images, source.channels) == ("folder", None, 5, 1)
    got = images_of(corpus)
    # In path order: deep/img001, deep/img003, deep/zz16, img000, img002.
    assert np.array_equal(got[[0, 1, 3, 4]], images[[1, 3, 0, 2]])
    assert (got[2] == 16).all()


def test_sources_are_mixed_in_the_order_given_and_each_row_names_its_source(tmp_path, shared_cache):
    np.save(tmp_path / "extra.npy", gray_stack(9, seed=5))
    write_pngs(tmp_path / "folder", gray_stack(3, seed=6))
    names = [str(tmp_path / "extra.npy"), "breastmnist", str(tmp_path / "folder")]
    corpus = load_unlabeled(names, data_dir=str(DATA), cache_dir=shared_cache)
    assert corpus.dataset.features["source"].names == names
    assert np.array_equal(sources_of(corpus), np.repeat([0, 1, 2], [9, 546, 3]))
    assert [s.kind for s in corpus.sources] == ["npy", "medmnist", "folder"]


# --- Repeats ---------------------------------------------------------------------------------


def test_repeats_set_the_images_per_epoch_with_a_seeded_random_subset_for_the_fraction(tmp_path):
    first, second = gray_stack(10, seed=7), gray_stack(8, seed=8)
    np.save(tmp_path / "a.npy", first)
    np.save(tmp_path / "b.npy", second)
    names = [str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]
    corpus = load_unlabeled(names, repeats=[2.5, 0.5], cache_dir=tmp_path / "cache", seed=3)
    assert [(s.repeats, s.used) for s in corpus.sources] == [(2.5, 25), (0.5, 4)]
    assert np.array_equal(sources_of(corpus), np.repeat([0, 1], [25, 4]))
    images = images_of(corpus)
    assert np.array_equal(images[:20], np.concatenate([first, first]))
    assert len({image.tobytes() for image in images[20:25]}) == 5  # five distinct extra rows of a
    assert all(any((image == row).all() for row in second) for image in images[25:])
    again = load_unlabeled(names, repeats=[2.5, 0.5], cache_dir=tmp_path / "cache", seed=3)
    assert np.array_equal(images_of(again), images)
    other_seeds = [images_of(load_unlabeled(names, repeats=[2.5, 0.5], cache_dir=tmp_path / "cache", seed=s))
                   for s in (4, 5)]
    assert any(not np.array_equal(other, images) for other in other_seeds)


# --- One size, one mode ----------------------------------------------------------------------


def test_a_colour_source_makes_the_whole_corpus_rgb_and_gray_images_get_three_equal_channels(tmp_path, synthetic_root, caplog):
    gray = gray_stack(4, seed=9)
    np.save(tmp_path / "gray.npy", gray)
    root = synthetic_root("dermamnist", counts=(6, 2, 2))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        corpus = load_unlabeled([str(tmp_path / "gray.npy"), "dermamnist"], data_dir=root, verify_md5=False,
                                cache_dir=tmp_path / "cache")
    assert corpus.channels == 3 and corpus.dataset.features["image"].mode == "RGB"
    images = images_of(corpus)
    assert images.shape == (10, 28, 28, 3)
    assert np.array_equal(images[:4], np.repeat(gray[..., None], 3, axis=-1))
    assert np.array_equal(images[4:], np.load(root / "dermamnist.npz")["train_images"])
    assert "make the corpus RGB" in caplog.text and str(tmp_path / "gray.npy") in caplog.text


def test_other_sizes_are_centre_cropped_to_a_square_and_resized_bicubic_with_a_log_line(tmp_path, caplog):
    wide = gray_stack(3, height=40, width=60, seed=10)
    np.save(tmp_path / "wide.npy", wide)
    colour = np.random.default_rng(11).integers(0, 256, size=(2, 50, 50, 3), dtype=np.uint8)
    write_pngs(tmp_path / "big", colour)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        corpus = load_unlabeled([str(tmp_path / "wide.npy"), str(tmp_path / "big")], size=32, cache_dir=tmp_path / "cache")
    images = images_of(corpus)
    assert images.shape == (5, 32, 32, 3)
    expected = np.asarray(Image.fromarray(wide[0]).crop((10, 0, 50, 40)).resize((32, 32), Image.BICUBIC))
    assert np.array_equal(images[0][..., 0], expected)
    assert np.array_equal(images[3], np.asarray(Image.fromarray(colour[0]).resize((32, 32), Image.BICUBIC)))
    assert [s.resized for s in corpus.sources] == [3, 2]
    assert "centre-cropped to a square and resized to 32x32" in caplog.text
    assert "resized to 32x32 (PIL bicubic)" in caplog.text


def test_an_edited_file_is_read_again_and_not_served_from_the_cache(tmp_path):
    path = tmp_path / "scans.npy"
    np.save(path, gray_stack(3, seed=12))
    load_unlabeled([str(path)], cache_dir=tmp_path / "cache")
    edited = gray_stack(3, seed=13)
    np.save(path, edited)
    assert np.array_equal(images_of(load_unlabeled([str(path)], cache_dir=tmp_path / "cache")), edited)


# --- Bad input: one line naming the problem and the fix --------------------------------------


def npy(array):
    def make(tmp_path):
        np.save(tmp_path / "bad.npy", array, allow_pickle=True)
        return [str(tmp_path / "bad.npy")], None
    return make


def just(*sources, repeats=None):
    return lambda tmp_path: ([s.format(tmp=tmp_path) for s in sources], repeats)


def empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return [str(tmp_path / "empty")], None


def folder_without_images(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "sub" / "notes.txt").write_text("x")
    return [str(tmp_path / "docs")], None


def truncated_png(tmp_path):
    (path,) = write_pngs(tmp_path / "pngs", gray_stack(1, seed=14))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return [str(tmp_path / "pngs")], None


def corrupt_npz(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    return [str(tmp_path / "bad.npz")], None


def damaged_npz_member(tmp_path):
    np.savez_compressed(tmp_path / "bad.npz", images=gray_stack(60, seed=15))
    data = bytearray((tmp_path / "bad.npz").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 100] = bytes(100)
    (tmp_path / "bad.npz").write_bytes(bytes(data))
    return [str(tmp_path / "bad.npz")], None


def npz_of(**arrays):
    def make(tmp_path):
        np.savez(tmp_path / "bad.npz", **arrays)
        return [str(tmp_path / "bad.npz")], None
    return make


def same_file_twice(tmp_path):
    np.save(tmp_path / "a.npy", gray_stack(2))
    shutil.copy(tmp_path / "a.npy", tmp_path / "copy.npy")
    return [str(tmp_path / "a.npy"), str(tmp_path / "copy.npy")], None


def same_path_two_spellings(tmp_path):
    np.save(tmp_path / "a.npy", gray_stack(2))
    return [str(tmp_path / "a.npy"), str(tmp_path / "." / "a.npy")], None


def not_an_array_file(tmp_path):
    (tmp_path / "scan.dcm").write_bytes(b"DICM")
    return [str(tmp_path / "scan.dcm")], None


def tiny_fraction(tmp_path):
    np.save(tmp_path / "a.npy", gray_stack(4))
    return [str(tmp_path / "a.npy")], [0.01]


BAD_INPUTS = {
    "unknown flag": (just("breastmnst"), ["'breastmnst'", "did you mean 'breastmnist'"]),
    "3D flag": (just("organmnist3d"), ["3D MedMNIST", "choose a 2D one"]),
    "flag at a size it does not come in": (lambda tmp_path: (["breastmnist"], None), ["no size 32", "28, 64, 128, 224"]),
    "missing path": (just("{tmp}/nowhere.npz"), ["nowhere.npz does not exist", "check the path"]),
    "empty folder": (empty_folder, ["is empty", "put the unlabelled image files"]),
    "folder without images": (folder_without_images, ["holds 1 file(s) but no images", "searched recursively"]),
    "truncated image in a folder": (truncated_png, ["cannot read", "img000.png", "replace or remove"]),
    "same flag twice": (just("breastmnist", "BreastMNIST"), ["given twice", "use repeats"]),
    "same path spelt twice": (same_path_two_spellings, ["given twice", "use repeats"]),
    "same file under two names": (same_file_twice, ["are the same file (MD5", "give it once"]),
    "repeats of the wrong length": (just("breastmnist", repeats=[1, 2]), ["2 repeats for 1 sources", "one repeat per source"]),
    "zero repeat": (just("breastmnist", repeats=[0]), ["must be > 0", "drop the source"]),
    "negative repeat": (just("breastmnist", repeats=[-1]), ["must be > 0"]),
    "nan repeat": (just("breastmnist", repeats=[math.nan]), ["not a finite number", "positive number"]),
    "infinite repeat": (just("breastmnist", repeats=[math.inf]), ["not a finite number"]),
    "repeat that selects nothing": (tiny_fraction, ["selects none", "raise it to at least 0.25"]),
    "corrupt npz": (corrupt_npz, ["bad.npz is not a readable .npz", "save the images again"]),
    "npz with a damaged array": (damaged_npz_member, ["cannot read", "bad.npz", "replace or remove"]),
    "npz of several unnamed arrays": (npz_of(a=gray_stack(2), b=gray_stack(2)), ["holds a, b", "named 'images'"]),
    "npz with only test images": (npz_of(test_images=gray_stack(2), test_labels=np.zeros((2, 1))),
                                  ["test_images but no train_images", "must not see"]),
    "not an array file": (not_an_array_file, ["scan.dcm is neither", "folder of image files"]),
    "float array": (npy(np.random.default_rng(0).random((2, 28, 28))), ["bad.npy has shape (2, 28, 28) and dtype float64", "convert to uint8 0-255"]),
    "uint16 array": (npy(np.zeros((2, 28, 28), np.uint16)), ["dtype uint16", "convert to uint8 0-255"]),
    "object array": (npy(np.array([np.zeros((2, 2)), "x"], dtype=object)), ["bad.npy", "dtype object", "save the images as a uint8 array"]),
    "2-D array": (npy(np.zeros((28, 28), np.uint8)), ["shape (28, 28)", "(N, H, W) gray"]),
    "five channels": (npy(np.zeros((2, 28, 28, 5), np.uint8)), ["shape (2, 28, 28, 5)", "(N, H, W, 3) RGB"]),
    "channels first": (npy(np.zeros((2, 3, 28, 28), np.uint8)), ["channels first", "np.moveaxis(images, 1, -1)"]),
    "no images": (npy(np.zeros((0, 28, 28), np.uint8)), ["shape (0, 28, 28)", "at least one image"]),
    "object array in an npz": (npz_of(images=np.array([1, "x"], dtype=object)), ["bad.npz", "uint8 array"]),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_every_bad_input_is_one_user_error_line_naming_the_problem_and_the_fix(name, tmp_path):
    make, fragments = BAD_INPUTS[name]
    sources, repeats = make(tmp_path)
    size = 32 if name == "flag at a size it does not come in" else 28
    with pytest.raises(UserError) as caught:
        load_unlabeled(sources, size, repeats=repeats, data_dir=str(DATA), cache_dir=tmp_path / "cache")
    message = str(caught.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_sources_and_repeats_are_checked_at_parse_time_without_reading_any_data(tmp_path):
    np.save(tmp_path / "a.npy", gray_stack(2))
    parsed = check_sources(["breastmnist", str(tmp_path / "a.npy"), str(tmp_path)], [1, 0.5, 2], size=64)
    assert [p.kind for p in parsed] == ["medmnist", "npy", "folder"]
    with pytest.raises(UserError, match="did you mean 'pneumoniamnist'"):
        check_sources(["pneumonia_mnist"])
    with pytest.raises(UserError, match="no unlabelled sources"):
        check_sources([])
    assert not (tmp_path / "cache").exists()
