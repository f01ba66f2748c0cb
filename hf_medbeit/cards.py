"""Model cards: a finished run folder -> ``README.md`` with Hub metadata, from ``model_cards/``.

The card is rendered with ``huggingface_hub.ModelCard.from_template`` and ``ModelCardData`` (the
YAML header, including the ``model-index`` with the test AUC and ACC, is written by
``huggingface_hub``, not by hand). Every figure in it is read from the run's own files:

* ``all_results.json``: metrics, data set, balancing, hyperparameters, hardware, wall time;
* ``trainer_state.json``: the validation history and the step of the selected checkpoint;
* ``config.json``: architecture and input size;
* ``confusion_matrix.json``: which classes the model predicts on the test split (columns) and which
  the test split holds (rows);
* ``roc_curve.png`` / ``confusion_matrix.png``: shown as images when present.

The data set's licence, description and official MD5 come from ``medmnist.INFO``: the card says
"official MedMNIST v2 splits" only when the run's recorded ``data_md5`` is that MD5. The MedMNIST
v2 reference rows come from ``model_cards/medmnist_v2_reference.json`` (with its source), and the
BibTeX from ``model_cards/citations.json`` (the architecture by ``model_type``, so a ResNet card
never cites BEiT).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from medmnist import INFO
from medmnist.info import HOMEPAGE

from . import outputs
from .data import MULTI_LABEL_TASK, get_spec
from .errors import UserError
from .metrics import metric_key
from .training import RECORDED_HYPERPARAMETERS

CARD_FILE = "README.md"
# The repository's top-level model_cards/, through the package's link to it, so that an installed
# wheel (which carries the template and the table as package data) finds them too.
MODEL_CARDS_DIR = Path(__file__).resolve().parent / "model_cards"
TEMPLATE = MODEL_CARDS_DIR / "model_card_template.md"
REFERENCE_TABLE = MODEL_CARDS_DIR / "medmnist_v2_reference.json"
# BibTeX by what is cited: architectures by model_type, the benchmark, source data sets by flag.
CITATIONS = MODEL_CARDS_DIR / "citations.json"

# medmnist.INFO's licence names -> Hub licence identifiers.
HUB_LICENSES = {"CC BY 4.0": "cc-by-4.0", "CC BY-NC 4.0": "cc-by-nc-4.0"}
LICENSE_URLS = {
    "cc-by-4.0": "https://creativecommons.org/licenses/by/4.0/",
    "cc-by-nc-4.0": "https://creativecommons.org/licenses/by-nc/4.0/",
}
# MedMNIST has no official dataset repository on the Hub; this id names the benchmark.
DATASET_ID = "medmnist"
# How architectures are spelled in titles; others use their class name.
MODEL_NAMES = {"beit": "BEiT", "vit": "ViT", "deit": "DeiT", "data2vec-vision": "Data2Vec-Vision", "dinov2": "DINOv2",
               "convnext": "ConvNeXT", "resnet": "ResNet", "swin": "Swin"}

def hub_license(medmnist_license: str) -> str | None:
    """'CC BY 4.0' -> 'cc-by-4.0'; None where the Hub has no identifier we know for it."""
    return HUB_LICENSES.get(medmnist_license.strip())


def reference_rows(flag: str) -> tuple[list[dict], dict]:
    """The MedMNIST v2 benchmark rows for ``flag`` (may be empty) and the table's provenance."""
    table = json.loads(REFERENCE_TABLE.read_text())
    return table["datasets"].get(flag, []), {"source": table["source"], "protocol": table["protocol"], "url": table["source_url"]}


def citations(model_type: str | None, flag: str) -> list[dict]:
    """What the card cites, from ``model_cards/citations.json``: the architecture the run trained
    (only where the file has it: a ResNet card never cites BEiT), MedMNIST v2, the source data set."""
    table = json.loads(CITATIONS.read_text())
    cited = []
    if model_type in table["architectures"]:
        cited.append(table["architectures"][model_type])
    cited.append(table["benchmark"])
    if flag in table["source_datasets"]:
        cited.append({"what": f"The source data set of {INFO[flag]['python_class']}", "bibtex": table["source_datasets"][flag]})
    return cited


def _official_md5(flag: str, size: int) -> str | None:
    try:
        return get_spec(flag, size).md5
    except UserError:
        return None


def data_origin(results: dict) -> tuple[bool, str]:
    """Whether the run used the official MedMNIST v2 file (its recorded MD5 equals medmnist.INFO's),
    and, where it did not or cannot be told, a sentence that says what the data was instead."""
    flag, size = results["dataset"], results.get("size", 28)
    pretty = INFO[flag]["python_class"]
    official = _official_md5(flag, size)
    recorded = results.get("data_md5")
    if recorded and recorded == official:
        return True, ""
    if recorded:
        what = (f"the user's own file in MedMNIST's {pretty} format (MD5 `{recorded}`), not the official "
                + (f"MedMNIST v2 file (MD5 `{official}`)" if official else f"MedMNIST v2 file (medmnist.INFO lists none at {size}x{size})"))
    else:
        what = f"a {pretty} file whose MD5 the run did not record, so it may not be the official MedMNIST v2 file"
    return False, (f"This model was trained and tested on {what}. Its results are not comparable to the "
                   "MedMNIST v2 reference rows as-is.")


def test_class_counts(run: Path, task: str, num_labels: int) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Per class (or finding): how many test images truly are it and how many the model predicts as
    it, and the number of test images, from ``confusion_matrix.json`` (rows true, columns
    predicted). None without a usable matrix."""
    data = _read_json(run / outputs.CONFUSION_FILE, required=False)
    try:
        matrix = np.asarray(data["matrix"], dtype=np.int64)
    except (KeyError, TypeError, ValueError):
        return None
    if task == MULTI_LABEL_TASK:  # (K, 2, 2): [[tn, fp], [fn, tp]] per finding
        if matrix.shape != (num_labels, 2, 2):
            return None
        return matrix[:, 1, :].sum(axis=1), matrix[:, :, 1].sum(axis=1), int(matrix[0].sum())
    if matrix.shape != (num_labels, num_labels):
        return None
    return matrix.sum(axis=1), matrix.sum(axis=0), int(matrix.sum())


def _selected_step(state: dict, results: dict) -> int | None:
    step = state.get("best_global_step")
    if step is None and results.get("best_model_checkpoint"):
        match = re.search(r"checkpoint-(\d+)$", str(results["best_model_checkpoint"]).rstrip("/\\"))
        step = int(match.group(1)) if match else None
    return step


def selection_note(state: dict, results: dict, metric: str) -> str:
    """Which model the run folder holds: the checkpoint selected on validation, or, where no
    selection was possible, the last one; said plainly either way."""
    step = _selected_step(state, results)
    metric = metric.upper() if metric.lower() in ("auc", "acc") else metric
    if step is not None:
        return f"the checkpoint with the best validation {metric} is the model in this repository, from step {step}"
    if not state and "best_model_checkpoint" not in results:
        return "the run folder does not record which checkpoint is the model in this repository"
    last = state.get("global_step")
    return (f"no checkpoint could be selected by validation {metric}: it was never defined (for example, the "
            "validation split holds only one class), so the model in this repository is the last one"
            + (f", from step {last}" if last is not None else ", from the end of training"))


def _read_json(path: Path, required: bool = True) -> dict:
    if not path.exists():
        if required:
            raise UserError(f"{path.parent} is not a finished run folder: {path.name} is missing; train to completion first")
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error}); the run folder is damaged") from error


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3g}"
        return f"{value:.{digits}f}".rstrip("0").rstrip(".") if digits else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(item, digits) for item in value)
    return str(value)


def _metric(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not recorded"
    minutes, secs = divmod(float(seconds), 60)
    hours, minutes = divmod(int(minutes), 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs:.0f} s"
    return f"{secs:.1f} s"


def _metric_definition(task: str) -> str:
    if task == "binary-class":
        return "AUC of the positive-class score; ACC at threshold 0.5 on that score."
    if task == MULTI_LABEL_TASK:
        return "AUC = mean of per-finding AUCs; ACC = mean per-finding accuracy at threshold 0.5."
    return "AUC = mean of one-vs-rest AUCs; ACC by argmax."


def _architecture(config: dict) -> str:
    model_type = config.get("model_type", "unknown")
    architecture = (config.get("architectures") or [model_type])[0]
    parts = [f"`{architecture}`"]
    for key, label in (("num_hidden_layers", "layers"), ("hidden_size", "hidden size"), ("num_attention_heads", "heads")):
        if key in config:
            parts.append(f"{config[key]} {label}")
    return ", ".join(parts)


def _model_family(config: dict) -> str:
    model_type = config.get("model_type", "")
    if model_type in MODEL_NAMES:
        return MODEL_NAMES[model_type]
    architecture = (config.get("architectures") or ["image"])[0]
    return architecture.removesuffix("ForImageClassification")


def _result_table(results: dict, label_names: list[str], absent_from_test: set[str]) -> tuple[list[str], list[list[str]]]:
    columns = ["AUC", "ACC", "balanced accuracy", *(f"recall {name}" for name in label_names)]
    rows = []
    for split, prefix in (("validation", "eval"), ("test", "test")):
        cells = [_metric(results.get(f"{prefix}_{key}")) for key in ("auc", "acc", "balanced_accuracy")]
        for name in label_names:
            # sklearn reports recall 0 for a class with no true image; it is undefined, not 0.
            undefined = prefix == "test" and name in absent_from_test
            cells.append("n/a" if undefined else _metric(results.get(f"{prefix}_recall_{metric_key(name)}")))
        rows.append([split, *cells])
    return columns, rows


def _epoch_table(state: dict, label_names: list[str]) -> tuple[list[str], list[list[str]]]:
    columns = ["loss", "AUC", "ACC", *(f"recall {name}" for name in label_names)]
    keys = ["eval_loss", "eval_auc", "eval_acc", *(f"eval_recall_{metric_key(name)}" for name in label_names)]
    rows = []
    for entry in state.get("log_history", []):
        if "eval_auc" in entry:
            rows.append([_fmt(entry.get("epoch"), 2), str(entry.get("step")), *(_metric(entry.get(key)) for key in keys)])
    return columns, rows


def _warnings(results: dict, label_names: list[str], counts, from_scratch: bool, image_size: int,
              data_note: str) -> list[str]:
    notes = [data_note] if data_note else []
    if counts is not None:
        # From the confusion matrix: true counts are its rows, predicted counts its columns.
        true_counts, predicted_counts, _ = counts
        never = [(name, int(true)) for name, true, predicted in zip(label_names, true_counts, predicted_counts)
                 if true > 0 and predicted == 0]
        if never:
            notes.append(
                "On the test split this model never predicts "
                + ", ".join(f"{name!r} (recall 0; {true} test images are {name!r})" for name, true in never)
                + ": it has collapsed towards the other class(es), whatever its accuracy says."
            )
        for name, predicted in ((name, int(predicted)) for name, true, predicted
                                in zip(label_names, true_counts, predicted_counts) if true == 0):
            notes.append(
                f"The test split holds no image of {name!r}, so its test recall is undefined (n/a below) and the "
                "test figures say nothing about how well the model finds it"
                + (f"; the model predicts {name!r} for {predicted} test images, all of them wrongly." if predicted
                   else "; the model predicts it for no test image.")
            )
    else:
        # Without a confusion matrix, recall 0 cannot tell a class never predicted from one absent from the split.
        zero = [name for name in label_names if results.get(f"test_recall_{metric_key(name)}") == 0.0]
        if zero:
            notes.append(
                f"Test recall is 0 for {', '.join(repr(n) for n in zero)}: either the model never predicts it or the test "
                "split holds none of it (the run folder has no confusion matrix to tell which)."
            )
    if from_scratch:
        notes.append(
            "This model was trained from a random initialisation (no pretrained weights)"
            + (f", at {image_size}x{image_size} input" if image_size else "")
            + ". It is a demonstration of the pipeline, not a competitive classifier."
        )
    return notes


def explained_images(run: Path) -> dict | None:
    """The explained test images (``RUN/explanations``, written by ``hf-medbeit explain --split
    test`` or at the end of training): the grid's path, how the images were chosen, how many
    right and wrong, and the sanity-check numbers per method. None when absent or unreadable."""
    folder = run / "explanations"
    summary = _read_json(folder / "explanations.json", required=False) if (folder / "grid.png").is_file() else {}
    if not summary or summary.get("split") != "test":
        return None
    images = summary.get("images") or []
    sanity = summary.get("sanity_checks") or {}
    return {
        "path": "explanations/grid.png",
        "selection": summary.get("selection", ""),
        "right": sum(1 for image in images if image.get("correct") is True),
        "wrong": sum(1 for image in images if image.get("correct") is False),
        "methods": ", ".join((summary.get("methods") or {}).values()),
        "sanity_rows": [
            [(summary.get("methods") or {}).get(method, method), f"{numbers['randomisation_rank_correlation']:.2f}",
             f"{numbers['deletion_auc']:.3f}", f"{numbers['deletion_auc_random']:.3f}"]
            for method, numbers in sanity.items()
        ],
    }


def _pretraining_text(pretraining: dict | None) -> str:
    """Where the base model came from when it is an `hf-medbeit pretrain` run folder."""
    if not pretraining:
        return ""
    objective = {"tokens": "predicting k-means visual tokens of masked patches, BEiT's objective",
                 "pixels": "regressing the pixels of masked patches"}.get(pretraining.get("mim_target"), "masked image modeling")
    epochs = pretraining.get("epochs")
    return (f" (a BEiT pre-trained without labels by hf-medbeit pretrain, {objective}, on "
            f"{', '.join(pretraining.get('sources', []))}: {pretraining.get('images_per_epoch', 0):,} images per epoch"
            + (f" for {epochs:g} epochs" if isinstance(epochs, (int, float)) else "") + ")")


def card_context(run_dir: str | os.PathLike, repo_id: str | None = None) -> tuple[ModelCardData, dict]:
    """The card's metadata and template variables, all read from the run folder."""
    run = Path(run_dir)
    results = outputs.read_results(run)
    config = _read_json(run / "config.json")
    state = _read_json(run / "trainer_state.json", required=False)

    flag = results["dataset"]
    size = results.get("size", 28)
    task = results["task"]
    label_names = list(results["label_names"])
    info = INFO[flag]
    pretty = info["python_class"]
    license_id = hub_license(info["license"])
    from_scratch = bool(results.get("trained_from_scratch", False))
    base_model = None if from_scratch else results.get("base_model")
    official_data, data_note = data_origin(results)
    counts = test_class_counts(run, task, len(label_names))
    absent_from_test = set() if counts is None else {name for name, true in zip(label_names, counts[0]) if true == 0}
    model_type = results.get("model_type") or config.get("model_type")
    image_size = config.get("image_size") or size
    model_name = repo_id or run.resolve().name
    model_ref = repo_id or "path/to/run_folder"

    dataset_name = (f"MedMNIST v2 {pretty} ({size}x{size})" if official_data
                    else f"{pretty} ({size}x{size}) format, own data (MD5 {results.get('data_md5') or 'not recorded'})")
    eval_results = [
        EvalResult(
            task_type="image-classification", task_name="Image Classification",
            dataset_type=DATASET_ID, dataset_name=dataset_name, dataset_config=flag, dataset_split="test",
            metric_type=metric_type, metric_name=metric_name, metric_value=round(float(results[key]), 4),
        )
        for metric_type, metric_name, key in (("roc_auc", "AUC", "test_auc"), ("accuracy", "ACC", "test_acc"))
        if results.get(key) is not None
    ]
    card_data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        datasets=[DATASET_ID],
        license=license_id or "other",
        license_name=None if license_id else info["license"],
        license_link=None if license_id else HOMEPAGE,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["image-classification", "medical-imaging", "medmnist", flag, model_type or "vision"],
        metrics=["roc_auc", "accuracy"],
        eval_results=eval_results or None,
    )

    hyperparameters = dict(results.get("hyperparameters") or {})
    metric_for_best_model = hyperparameters.get("metric_for_best_model", "auc")
    selection = selection_note(state, results, metric_for_best_model)
    ordered = [key for key in RECORDED_HYPERPARAMETERS if key in hyperparameters]
    ordered += sorted(key for key in hyperparameters if key not in ordered)
    hyperparameter_rows = [(f"`{key}`", _fmt(hyperparameters[key], 6)) for key in ordered]

    balancing = results.get("balancing", "none")
    balancing_text = {
        "none": "no class balancing",
        "weighted_loss": "a class-weighted loss (weights "
        + ", ".join(f"{name}: {weight:.3f}" for name, weight in zip(label_names, results.get("class_weights") or []))
        + ")",
        "undersample": "random undersampling of the training split",
        "oversample": "random oversampling of the training split",
    }.get(balancing, balancing)
    if balancing in ("undersample", "oversample") and results.get("balance_ratio") is not None:
        balancing_text += f" (majority share {results['balance_ratio']})"
    top_layers = results.get("trainable_top_layers")
    frozen_text = (
        "all layers trained" if top_layers is None
        else f"all but the top {top_layers} transformer blocks (and the final norm, pooler and head) frozen"
    )
    init_text = (
        f"random initialisation from a `{model_type}` config"
        + (f" (`{results['config_overrides']}`)" if results.get("config_overrides") else "")
        if from_scratch
        else f"fine-tuned from `{results.get('model_name_or_path') or base_model}`" + _pretraining_text(results.get("pretraining"))
    )
    procedure = (
        f"Hugging Face `Trainer` (hf_medbeit's weighted-loss subclass), {init_text}; {frozen_text}; {balancing_text}"
        + (f"; layer-wise learning-rate decay {results['layer_decay']}" if results.get("layer_decay") else "")
        + ("; random crop/flip/rotation augmentation" if results.get("augment") else "; no augmentation")
        + f". {selection[0].upper()}{selection[1:]}; that model was evaluated once on the test split."
    )

    epoch_columns, epoch_rows = _epoch_table(state, label_names)
    result_columns, result_rows = _result_table(results, label_names, absent_from_test)
    references, reference_meta = reference_rows(flag)
    train_counts = results.get("train_class_counts") or []
    # INFO's split sizes describe the official file only; the test size of another file comes
    # from its own confusion matrix.
    n_samples = info.get("n_samples", {}) if official_data else {}
    test_examples = counts[2] if counts is not None else n_samples.get("test", "n/a")
    images = [
        {"alt": alt, "path": name}
        for alt, name in (("ROC curve on the test split", outputs.ROC_PLOT), ("Confusion matrix on the test split", outputs.CONFUSION_PLOT))
        if (run / name).exists()
    ]
    ci = results.get("test_auc_ci95")
    versions = results.get("framework_versions") or {}

    context = {
        "title": f"{model_name}: {pretty} ({size}x{size}) {_model_family(config)} classifier",
        "summary": (
            f"An image classifier for **{pretty}** ({task} task: "
            f"{', '.join(repr(name) for name in label_names)}), {init_text}, trained with hf_medbeit on "
            + ("the official MedMNIST v2 splits. " if official_data
               else "the user's own data in MedMNIST's format, not the official MedMNIST v2 file (see below). ")
            + f"Test AUC {_metric(results.get('test_auc'))}, ACC {_metric(results.get('test_acc'))}."
        ),
        "warnings": _warnings(results, label_names, counts, from_scratch, image_size, data_note),
        "architecture": _architecture(config),
        "initialisation": init_text,
        "input_description": f"RGB images resized by the image processor to {image_size}x{image_size} (grayscale is replicated to 3 channels)",
        "classes": ", ".join(f"{index}: {name}" for index, name in enumerate(label_names)),
        "total_parameters": "n/a" if results.get("total_parameters") is None else f"{results['total_parameters']:,}",
        "trainable_parameters": "n/a" if results.get("trainable_parameters") is None else f"{results['trainable_parameters']:,}",
        "dataset_pretty": pretty,
        "image_size": size,
        "test_examples": test_examples,
        "official_data": official_data,
        "official_md5": _official_md5(flag, size) or "not listed in medmnist.INFO",
        "data_note": data_note,
        "score_kind": "sigmoid probabilities, one per finding" if task == MULTI_LABEL_TASK else "softmax probabilities",
        "medmnist_homepage": HOMEPAGE,
        "dataset_description": info["description"],
        "dataset_license": f"{info['license']} ({LICENSE_URLS[license_id]})" if license_id else info["license"],
        "task": task,
        "split_sizes": ", ".join(f"{split} {count}" for split, count in n_samples.items()),
        "train_examples": results.get("train_examples", "n/a"),
        "train_class_counts": ", ".join(f"{name}: {count}" for name, count in zip(label_names, train_counts)) or "n/a",
        "data_md5": results.get("data_md5", "n/a"),
        "procedure_summary": procedure,
        "hyperparameters": hyperparameter_rows,
        "hardware": results.get("hardware", "not recorded"),
        "wall_time": _duration(results.get("wall_time_seconds")),
        "framework_versions": ", ".join(f"{name} {version}" for name, version in versions.items()) or "not recorded",
        "selection_note": selection,
        "epoch_columns": epoch_columns,
        "epoch_rows": epoch_rows,
        "metric_definition": _metric_definition(task),
        "result_columns": result_columns,
        "result_rows": result_rows,
        "test_auc_ci": f"{ci[0]:.3f} to {ci[1]:.3f}" if ci and None not in ci else "not available",
        "test_auc": _metric(results.get("test_auc")),
        "test_acc": _metric(results.get("test_acc")),
        "reference_rows": [{**row, "auc": f"{row['auc']:.3f}", "acc": f"{row['acc']:.3f}"} for row in references],
        "reference_source": f"{reference_meta['source']} ({reference_meta['url']})",
        "reference_protocol": reference_meta["protocol"],
        "images": images,
        "explained": explained_images(run),
        "model_ref": model_ref,
        "citations": citations(model_type, flag),
        "multi_label": task == MULTI_LABEL_TASK,
    }
    return card_data, context


def render_card(run_dir: str | os.PathLike, repo_id: str | None = None) -> ModelCard:
    """The model card of a finished run (a fine-tuned classifier, or a pre-trained encoder from
    ``hf-medbeit pretrain``); ``repo_id`` names the Hub repository in the card."""
    if run_kind(run_dir) == "pretrain":
        from .pretraining_card import TEMPLATE as template, pretraining_card_context as context_of
    else:
        template, context_of = TEMPLATE, card_context
    card_data, context = context_of(run_dir, repo_id)
    return ModelCard.from_template(card_data, template_path=str(template), **context)


def run_kind(run_dir: str | os.PathLike) -> str:
    """train or pretrain, as the run's all_results.json says (the readers then check it whole)."""
    try:
        return json.loads((Path(run_dir) / outputs.RESULTS_FILE).read_text()).get("kind", "train")
    except (OSError, ValueError, AttributeError):
        return "train"


def write_card(run_dir: str | os.PathLike, repo_id: str | None = None) -> Path:
    """Render the card into ``RUN_DIR/README.md`` (atomically)."""
    path = Path(run_dir) / CARD_FILE
    card = render_card(run_dir, repo_id)
    with outputs.atomic_path(path) as temporary:
        temporary.write_text(str(card), encoding="utf-8")
    return path
