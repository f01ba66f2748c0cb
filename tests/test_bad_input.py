"""Bad input ends with one clear line, a non-zero exit, and nothing half-written."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import DATA, TINY_BEIT, assert_nothing_written, assert_one_line_error, npz_name, run_cli, write_medmnist_npz

pytestmark = pytest.mark.e2e


def train_args(root, out, cache, *extra):
    return (
        "train", "--data_dir", str(root), "--dataset_cache_dir", str(cache), "--output_dir", str(out),
        "--model_type", "beit", "--config_overrides", TINY_BEIT, "--max_steps", "1", "--report_to", "none", "--explain_per_class", "0", *extra,
    )


def copy_official(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(DATA / "breastmnist.npz", root / "breastmnist.npz")
    return root


def test_unknown_dataset_lists_the_valid_ones(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = run_cli(*train_args(DATA, out, cache, "--dataset_name", "brestmnist"))
    assert_one_line_error(result, "unknown MedMNIST data set 'brestmnist'", "breastmnist", "pneumoniamnist", "organsmnist")
    assert_nothing_written(out, cache)


def test_3d_dataset_is_refused(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = run_cli(*train_args(DATA, out, cache, "--dataset_name", "organmnist3d"))
    assert_one_line_error(result, "3D", "choose a 2D one")
    assert_nothing_written(out, cache)


def test_size_not_in_info(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = run_cli(*train_args(DATA, out, cache, "--dataset_name", "breastmnist", "--size", "32"))
    assert_one_line_error(result, "no size 32", "28, 64, 128, 224")
    assert_nothing_written(out, cache)


def test_wrong_md5(tmp_path):
    root = tmp_path / "root"
    write_medmnist_npz(root / "breastmnist.npz", "breastmnist")
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = run_cli(*train_args(root, out, cache, "--dataset_name", "breastmnist"))
    assert_one_line_error(result, "MD5", "750601b1f35ba3300ea97c75c52ff8f6", "download it again")
    assert_nothing_written(out, cache)


@pytest.mark.parametrize("skip_md5", [False, True])
def test_truncated_npz(tmp_path, skip_md5):
    root = copy_official(tmp_path)
    path = root / "breastmnist.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out, cache = tmp_path / "out", tmp_path / "cache"
    extra = ("--skip_md5_check", "true") if skip_md5 else ()
    result = run_cli(*train_args(root, out, cache, "--dataset_name", "breastmnist", *extra))
    line = assert_one_line_error(result, "download it again")
    assert ("truncated" in line) if skip_md5 else ("MD5" in line)
    assert_nothing_written(out, cache)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_damaged_member_inside_the_archive(tmp_path, workers):
    # A byte run flipped inside a compressed member: found while streaming (the CRC), in the
    # conversion's worker processes too, and still reported in one line.
    import zipfile

    root = tmp_path / "root"
    path = write_medmnist_npz(root / "dermamnist.npz", "dermamnist", counts=(2200, 8, 14))  # 2 ranges of rows
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        member = archive.getinfo("train_images.npy")
    middle = member.header_offset + 100 + member.compress_size * 3 // 4
    data[middle : middle + 64] = bytes(byte ^ 0xFF for byte in data[middle : middle + 64])
    path.write_bytes(bytes(data))
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = run_cli(*train_args(root, out, cache, "--dataset_name", "dermamnist", "--skip_md5_check", "true",
                                 "--preprocessing_num_workers", workers))
    assert_one_line_error(result, "dermamnist.npz is truncated or not a valid MedMNIST .npz", "Bad CRC-32",
                          "train_images.npy", "download it again")
    assert_nothing_written(out, cache)


def test_preprocessing_workers_must_be_positive(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = run_cli(*train_args(DATA, out, cache, "--dataset_name", "breastmnist", "--preprocessing_num_workers", "0"))
    assert_one_line_error(result, "--preprocessing_num_workers must be 1 or more, not 0")
    assert_nothing_written(out, cache)


def test_missing_file_with_downloads_off(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = run_cli(*train_args(root, out, cache, "--dataset_name", "pneumoniamnist", "--size", "224"))
    assert_one_line_error(result, "pneumoniamnist_224.npz not found in", str(root), "zenodo.org", "--download")
    assert_nothing_written(out, cache)


def test_unknown_key_in_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"dataset_name: breastmnist\ndata_dir: {DATA}\nlearnig_rate: 0.001\noutput_dir: {tmp_path / 'out'}\n")
    result = run_cli("train", str(config))
    assert_one_line_error(result, "learnig_rate")
    assert not (tmp_path / "out").exists()


def test_labels_out_of_range(tmp_path):
    root = tmp_path / "root"
    path = write_medmnist_npz(root / npz_name("breastmnist", 28), "breastmnist")
    arrays = dict(np.load(path, allow_pickle=False))
    arrays["val_labels"][3] = 7
    np.savez_compressed(path, **arrays)
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = run_cli(*train_args(root, out, cache, "--dataset_name", "breastmnist", "--skip_md5_check", "true"))
    assert_one_line_error(result, "val_labels[3] = [7] is out of range", "0..1")
    assert_nothing_written(out, cache)


def test_trainable_top_layers_deeper_than_the_model(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = run_cli(*train_args(DATA, out, cache, "--dataset_name", "breastmnist", "--trainable_top_layers", "5"))
    assert_one_line_error(result, "--trainable_top_layers 5 is out of range", "has 2 transformer blocks")
    assert not out.exists()


def test_unknown_command():
    result = run_cli("trian")
    assert_one_line_error(result, "unknown command 'trian'", "train")
