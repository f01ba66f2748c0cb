"""Loading a run folder with from_pretrained / pipeline, and `hf-medbeit predict` on image files."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import DATA, assert_one_line_error, run_cli
from hf_medbeit import outputs
from hf_medbeit.errors import UserError
from hf_medbeit.inference import find_images, load_image, to_rgb
from hf_medbeit.predict import main as predict_main
from tiny_run import trained_run

N_IMAGES = 12
ATOL = 2e-5  # float32 forward passes of the same inputs; the CSV keeps 8 significant digits


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def test_images():
    with np.load(DATA / "breastmnist.npz") as archive:
        return archive["test_images"][:N_IMAGES]


def expected_scores(run_dir, count=N_IMAGES) -> np.ndarray:
    with open(run_dir / outputs.PREDICTIONS_FILE, newline="") as handle:
        rows = list(csv.DictReader(handle))
    score_columns = [key for key in rows[0] if key.startswith("score_")]
    return np.array([[float(row[key]) for key in score_columns] for row in rows[:count]])


def write_pngs(folder, images, mode="L"):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = folder / f"test_{index:03d}.png"
        pil = Image.fromarray(image, mode="L")
        if mode == "RGB":
            pil = pil.convert("RGB")
        elif mode == "RGBA":
            pil = pil.convert("RGBA")  # opaque: alpha 255 everywhere
        elif mode == "I;16":
            pil = Image.fromarray(image.astype(np.uint16) * 257)  # 0..255 -> 0..65535
        pil.save(path)
        paths.append(path)
    return paths


def read_csv_scores(path) -> dict[str, np.ndarray]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = [key for key in rows[0] if key.startswith("score_")]
    return {row["path"]: np.array([float(row[key]) for key in columns]) for row in rows}


def test_from_pretrained_and_pipeline_reproduce_test_predictions(run_dir, test_images, tmp_path):
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    expected = expected_scores(run_dir)
    model = AutoModelForImageClassification.from_pretrained(run_dir).eval()
    processor = AutoImageProcessor.from_pretrained(run_dir)
    pil_images = [Image.fromarray(image, mode="L").convert("RGB") for image in test_images]
    with torch.inference_mode():
        logits = model(**processor(pil_images, return_tensors="pt")).logits
    np.testing.assert_allclose(torch.softmax(logits, -1).numpy(), expected, atol=ATOL)

    classifier = pipeline("image-classification", model=str(run_dir), device="cpu")
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    paths = write_pngs(tmp_path / "gray", test_images)
    for path, row in zip(paths, expected):
        result = {entry["label"]: entry["score"] for entry in classifier(str(path), top_k=None)}
        np.testing.assert_allclose([result[name] for name in names], row, atol=ATOL)
    # RGB and RGBA files and a larger image go through the pipeline too.
    for mode in ("RGB", "RGBA"):
        path = write_pngs(tmp_path / mode, test_images[:1], mode=mode)[0]
        result = {entry["label"]: entry["score"] for entry in classifier(Image.open(path), top_k=None)}
        np.testing.assert_allclose([result[name] for name in names], expected[0], atol=ATOL)
    big = Image.fromarray(test_images[0], mode="L").resize((300, 200))
    assert len(classifier(big, top_k=None)) == len(names)


def test_to_rgb_scales_16_bit_and_composites_alpha():
    sixteen = Image.fromarray(np.array([[0, 4096, 32768, 65535]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    assert np.asarray(to_rgb(sixteen))[0, :, 0].tolist() == [0, 16, 128, 255]  # scaled, not clipped to 255
    rgba = Image.new("RGBA", (2, 1), (200, 100, 50, 0))
    rgba.putpixel((1, 0), (200, 100, 50, 255))
    assert np.asarray(to_rgb(rgba)).tolist() == [[[0, 0, 0], [200, 100, 50]]]
    assert to_rgb(Image.new("L", (5, 7), 9)).mode == "RGB"
    assert to_rgb(Image.new("1", (3, 3))).mode == "RGB"
    palette = Image.new("P", (2, 2))
    assert to_rgb(palette).size == (2, 2)


def test_predict_command_handles_image_kinds_and_skips_unreadable(run_dir, test_images, tmp_path):
    expected = expected_scores(run_dir)
    folder = tmp_path / "inputs"
    gray = write_pngs(folder / "gray", test_images)
    rgb = write_pngs(folder / "rgb", test_images[:2], mode="RGB")
    rgba = write_pngs(folder / "rgba", test_images[:2], mode="RGBA")
    sixteen = write_pngs(folder / "sixteen", test_images[:2], mode="I;16")
    large = folder / "large.png"
    Image.fromarray(test_images[0], mode="L").resize((512, 384)).save(large)
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    output = tmp_path / "predictions.csv"

    result = run_cli("predict", "--model", str(run_dir), str(folder), "--output", str(output), "--batch_size", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipped {corrupt}" in result.stderr
    scores = read_csv_scores(output)
    assert len(scores) == N_IMAGES + 2 + 2 + 2 + 1
    assert str(corrupt) not in scores
    for group in (gray, rgb, rgba, sixteen):
        for index, path in enumerate(group):
            np.testing.assert_allclose(scores[str(path)], expected[index], atol=ATOL, err_msg=str(path))
    assert scores[str(large)].sum() == pytest.approx(1.0, abs=1e-6)
    with open(output, newline="") as handle:
        header = next(csv.reader(handle))
    assert header[:2] == ["path", "prediction"]


def test_predict_command_json_output_and_explicit_files(run_dir, test_images, tmp_path):
    expected = expected_scores(run_dir, 3)
    paths = write_pngs(tmp_path / "imgs", test_images[:3])
    output = tmp_path / "predictions.json"
    result = run_cli("predict", "--model", str(run_dir), *map(str, paths), "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads(output.read_text())
    assert [record["path"] for record in records] == list(map(str, paths))
    for record, row in zip(records, expected):
        assert list(record["scores"]) == ["malignant", "normal, benign"]
        np.testing.assert_allclose(list(record["scores"].values()), row, atol=ATOL)
        assert record["prediction"] == ["malignant", "normal, benign"][int(np.argmax(row))]


def test_predict_command_fails_in_one_line_when_nothing_is_readable(run_dir, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    output = tmp_path / "out.csv"
    result = run_cli("predict", "--model", str(run_dir), str(bad), "--output", str(output))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("hf-medbeit: error:") and "none of the 1 files" in last
    assert "Traceback" not in result.stderr
    assert not output.exists()
    with pytest.raises(UserError, match="does not exist"):
        predict_main(["--model", str(run_dir), str(tmp_path / "nope")])
    with pytest.raises(UserError, match="must end in .csv or .json"):
        predict_main(["--model", str(run_dir), str(bad), "--output", str(tmp_path / "out.txt")])


def test_find_images_walks_folders(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.png", "a/b/2.JPG", "a/b/skip.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in find_images([str(tmp_path / "a")])] == ["a/1.png", "a/b/2.JPG"]


def test_load_image_reads_first_frame_of_multiframe(tmp_path):
    frames = [Image.new("L", (4, 4), value) for value in (10, 200)]
    path = tmp_path / "stack.tif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert np.asarray(load_image(path))[0, 0].tolist() == [10, 10, 10]


# --- Arguments checked before the model is loaded (issue 9, section 4) --------------------------
# "Loading weights" is transformers' progress line: its absence shows no model was loaded.


def test_a_mistyped_local_model_path_is_reported_as_a_missing_folder_not_as_a_hub_failure(run_dir, test_images, tmp_path):
    image = write_pngs(tmp_path / "imgs", test_images[:1])[0]
    (tmp_path / "runs" / "tiny-run").mkdir(parents=True)

    result = run_cli("predict", "--model", "./runs/typo-folder", str(image), cwd=tmp_path)
    line = assert_one_line_error(result, "./runs/typo-folder", f"local folder {tmp_path / 'runs' / 'typo-folder'} does not exist")
    assert "huggingface.co" not in line and "Loading weights" not in result.stderr

    # A close name in the same folder is suggested.
    result = run_cli("predict", "--model", "./runs/tiny-rn", str(image), cwd=tmp_path)
    assert_one_line_error(result, "does not exist", "did you mean --model runs/tiny-run?")

    # runs/typo-folder could also be a Hub id (namespace "runs"): both readings are ruled out.
    result = run_cli("predict", "--model", "runs/typo-folder", str(image), cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(result, f"no local folder {tmp_path / 'runs' / 'typo-folder'}", "no Hub repository", "offline")


def test_a_hub_id_whose_namespace_is_also_a_local_folder_still_loads_from_the_hub(run_dir, test_images, tmp_path):
    """The local-path checks must not swallow Hub ids: user/tiny, with a local user/ folder, is
    loaded by from_pretrained from the Hub cache (offline, as a model downloaded earlier is)."""
    snapshot = tmp_path / "hf_home" / "hub" / "models--user--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        shutil.copy(run_dir / name, snapshot / name)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    (tmp_path / "user").mkdir()
    image = write_pngs(tmp_path / "imgs", test_images[:1])[0]

    result = run_cli("predict", "--model", "user/tiny", str(image), cwd=tmp_path,
                     env={"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    row = result.stdout.splitlines()[1].split(",")
    np.testing.assert_allclose([float(value) for value in row[-2:]], expected_scores(run_dir, 1)[0], atol=ATOL)


def test_an_unfinished_run_folder_points_to_its_last_checkpoint_which_then_works(run_dir, test_images, tmp_path):
    # A run stopped after its first epoch: checkpoints, but no config.json at the top yet.
    unfinished = tmp_path / "unfinished"
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    shutil.copytree(checkpoints[0], unfinished / checkpoints[0].name)
    image = write_pngs(tmp_path / "imgs", test_images[:1])[0]
    output = tmp_path / "out.csv"

    result = run_cli("predict", "--model", str(unfinished), str(image), "--output", str(output))
    assert_one_line_error(result, "not a finished run", "no config.json", f"--model {unfinished / checkpoints[0].name}")
    assert "model_type" not in result.stderr and not output.exists()

    retry = run_cli("predict", "--model", str(unfinished / checkpoints[0].name), str(image), "--output", str(output))
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert len(read_csv_scores(output)) == 1


def test_a_folder_without_config_json_or_checkpoints_is_not_a_run(run_dir, test_images, tmp_path):
    image = write_pngs(tmp_path / "imgs", test_images[:1])[0]
    with pytest.raises(UserError, match="has no config.json, so it is not a run folder"):
        predict_main(["--model", str(tmp_path / "imgs"), str(image)])
    (tmp_path / "killed" / "checkpoint-7").mkdir(parents=True)  # its save never finished
    with pytest.raises(UserError, match="holds no complete checkpoint; finish training"):
        predict_main(["--model", str(tmp_path / "killed"), str(image)])
    with pytest.raises(UserError, match="is not a folder"):
        predict_main(["--model", str(image), str(image)])


def test_device_cuda_without_a_visible_gpu_is_one_line_that_says_use_cpu(run_dir, test_images, tmp_path):
    image = write_pngs(tmp_path / "imgs", test_images[:1])[0]
    # An empty CUDA_VISIBLE_DEVICES hides every GPU, so this holds on a GPU machine too.
    result = run_cli("predict", "--model", str(run_dir), str(image), "--device", "cuda", env={"CUDA_VISIBLE_DEVICES": ""})
    line = assert_one_line_error(result, "--device cuda", "no CUDA device is visible", "use --device cpu")
    assert "Loading weights" not in result.stderr, line


@pytest.mark.parametrize("device, message", [
    ("gpu", "--device gpu is not a device name; use --device cpu, cuda or cuda:N"),
    ("cuda:x", "--device cuda:x is not a device name"),
    ("meta", "--device meta: hf-medbeit runs on cpu, cuda or mps"),
])
def test_an_unknown_device_string_is_a_user_error(run_dir, tmp_path, device, message):
    with pytest.raises(UserError, match=message):
        predict_main(["--model", str(run_dir), str(tmp_path), "--device", device])


def test_output_that_is_a_directory_is_refused_before_the_model_is_loaded(run_dir, test_images, tmp_path):
    image = write_pngs(tmp_path / "imgs", test_images[:1])[0]
    existing = tmp_path / "results.csv"  # a folder, even with the right suffix
    existing.mkdir()
    result = run_cli("predict", "--model", str(run_dir), str(image), "--output", str(existing))
    assert_one_line_error(result, f"--output {existing} is a directory", f"--output {existing / 'predictions.csv'}")
    assert "Loading weights" not in result.stderr
    assert list(existing.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "results.csv"]
    with pytest.raises(UserError, match="is a file, not a folder"):
        predict_main(["--model", str(run_dir), str(image), "--output", str(image / "out.csv")])


def test_symlink_loops_and_broken_links_are_reported_as_skipped(run_dir, test_images, tmp_path):
    expected = expected_scores(run_dir, 2)
    folder = tmp_path / "scans"
    good = write_pngs(folder, test_images[:2])
    os.symlink("self.png", folder / "self.png")  # a link to itself: ELOOP
    os.symlink("b.png", folder / "a.png")  # a two-link cycle
    os.symlink("a.png", folder / "b.png")
    os.symlink("moved-away.png", folder / "gone.png")
    os.symlink("..", folder / "up")  # a folder link back above the input: would walk everything, then loop
    named = tmp_path / "named.png"
    os.symlink("named.png", named)  # named on the command line
    output = tmp_path / "out.csv"

    result = run_cli("predict", "--model", str(run_dir), str(folder), str(named), "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    for path in (folder / "self.png", folder / "a.png", folder / "b.png", named):
        assert f"hf-medbeit: skipped {path}: cannot read it (symbolic link loop)" in result.stderr
    assert f"hf-medbeit: skipped {folder / 'gone.png'}: cannot read it (broken symbolic link to moved-away.png)" in result.stderr
    assert f"hf-medbeit: skipped {folder / 'up'}: not followed (symbolic link loop back to {tmp_path.resolve()})" in result.stderr
    assert "scored 2 of 8 files, skipped 6 unreadable" in result.stderr
    scores = read_csv_scores(output)
    assert list(scores) == list(map(str, good))
    np.testing.assert_allclose(np.array(list(scores.values())), expected, atol=ATOL)

    # Nothing readable at all: still one error line, and the loop is still named.
    only_loop = run_cli("predict", "--model", str(run_dir), str(named), "--output", str(tmp_path / "none.csv"))
    assert_one_line_error(only_loop, "none of the 1 files could be read")
    assert f"skipped {named}: cannot read it (symbolic link loop)" in only_loop.stderr
    assert not (tmp_path / "none.csv").exists()


def test_find_images_follows_folder_links_and_stops_at_loops(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "a" / "1.png").write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "2.png").write_bytes(b"x")
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "linked")  # followed, as rglob would not
    os.symlink("../data", tmp_path / "elsewhere" / "back")  # data/linked/back -> data: a loop
    skipped = []
    found = find_images([str(tmp_path / "data")], on_skip=lambda path, reason: skipped.append((path, reason)))
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["data/a/1.png", "data/linked/2.png"]
    assert skipped == [(tmp_path / "data" / "linked" / "back", f"not followed (symbolic link loop back to {(tmp_path / 'data').resolve()})")]
