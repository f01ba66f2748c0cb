"""Model cards: a finished run folder -> ``README.md`` with Hub metadata, from ``model_cards/``.

The card is rendered with ``huggingface_hub.ModelCard.from_template`` and ``ModelCardData`` (the
YAML header, including the ``model-index`` with the test AUC and ACC, is written by
``huggingface_hub``, not by hand). Every figure in it is read from the run's own files:

* ``all_results.json``: metrics, data set, balancing, hyperparameters, hardware, wall time;
* ``trainer_state.json``: the validation history and the step of the selected checkpoint;
* ``config.json``: architecture and input size;
* ``roc_curve.png`` / ``confusion_matrix.png``: shown as images when present.

The data set's licence and description come from ``medmnist.INFO``; the MedMNIST v2 reference
rows from ``model_cards/medmnist_v2_reference.json`` (with its source).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from medmnist import INFO
from medmnist.info import HOMEPAGE

from . import outputs
from .data import MULTI_LABEL_TASK
from .errors import UserError
from .metrics import metric_key
from .training import RECORDED_HYPERPARAMETERS

CARD_FILE = "README.md"
# The repository's top-level model_cards/, through the package's link to it, so that an installed
# wheel (which carries the template and the table as package data) finds them too.
MODEL_CARDS_DIR = Path(__file__).resolve().parent / "model_cards"
TEMPLATE = MODEL_CARDS_DIR / "model_card_template.md"
REFERENCE_TABLE = MODEL_CARDS_DIR / "medmnist_v2_reference.json"

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

BEIT_CITATION = """@inproceedings{bao2022beit,
  title     = {{BEiT}: {BERT} Pre-Training of Image Transformers},
  author    = {Bao, Hangbo and Dong, Li and Piao, Songhao and Wei, Furu},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2022},
  url       = {https://arxiv.org/abs/2106.08254}
}"""

MEDMNIST_CITATION = """@article{yang2023medmnistv2,
  title   = {{MedMNIST} v2 - A large-scale lightweight benchmark for {2D} and {3D} biomedical image classification},
  author  = {Yang, Jiancheng and Shi, Rui and Wei, Donglai and Liu, Zequan and Zhao, Lin and Ke, Bilian and Pfister, Hanspeter and Ni, Bingbing},
  journal = {Scientific Data},
  volume  = {10},
  number  = {1},
  pages   = {41},
  year    = {2023},
  doi     = {10.1038/s41597-022-01721-8}
}"""

# The source data set behind each MedMNIST subset, where this project cites it directly.
SOURCE_CITATIONS = {
    "breastmnist": """@article{aldhabyani2020breast,
  title   = {Dataset of breast ultrasound images},
  author  = {Al-Dhabyani, Walid and Gomaa, Mohammed and Khaled, Hussien and Fahmy, Aly},
  journal = {Data in Brief},
  volume  = {28},
  pages   = {104863},
  year    = {2020},
  doi     = {10.1016/j.dib.2019.104863}
}""",
    "pneumoniamnist": """@article{kermany2018identifying,
  title   = {Identifying Medical Diagnoses and Treatable Diseases by Image-Based Deep Learning},
  author  = {Kermany, Daniel S. and Goldbaum, Michael and Cai, Wenjia and Valentim, Carolina C. S. and Liang, Huiying and Baxter, Sally L. and McKeown, Alex and Yang, Ge and Wu, Xiaokang and Yan, Fangbing and others},
  journal = {Cell},
  volume  = {172},
  number  = {5},
  pages   = {1122--1131.e9},
  year    = {2018},
  doi     = {10.1016/j.cell.2018.02.010}
}""",
    "dermamnist": """@article{tschandl2018ham10000,
  title   = {The {HAM10000} dataset, a large collection of multi-source dermatoscopic images of common pigmented skin lesions},
  author  = {Tschandl, Philipp and Rosendahl, Cliff and Kittler, Harald},
  journal = {Scientific Data},
  volume  = {5},
  pages   = {180161},
  year    = {2018},
  doi     = {10.1038/sdata.2018.161}
}""",
}

def hub_license(medmnist_license: str) -> str | None:
    """'CC BY 4.0' -> 'cc-by-4.0'; None where the Hub has no identifier we know for it."""
    return HUB_LICENSES.get(medmnist_license.strip())


def reference_rows(flag: str) -> tuple[list[dict], dict]:
    """The MedMNIST v2 benchmark rows for ``flag`` (may be empty) and the table's provenance."""
    table = json.loads(REFERENCE_TABLE.read_text())
    return table["datasets"].get(flag, []), {"source": table["source"], "protocol": table["protocol"], "url": table["source_url"]}


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
    return "n/a" if value is None else f"{value:.3f}"


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


def _result_table(results: dict, label_names: list[str]) -> tuple[list[str], list[list[str]]]:
    columns = ["AUC", "ACC", "balanced accuracy", *(f"recall {name}" for name in label_names)]
    rows = []
    for split, prefix in (("validation", "eval"), ("test", "test")):
        keys = [f"{prefix}_auc", f"{prefix}_acc", f"{prefix}_balanced_accuracy",
                *(f"{prefix}_recall_{metric_key(name)}" for name in label_names)]
        rows.append([split, *(_metric(results.get(key)) for key in keys)])
    return columns, rows


def _epoch_table(state: dict, label_names: list[str]) -> tuple[list[str], list[list[str]]]:
    columns = ["loss", "AUC", "ACC", *(f"recall {name}" for name in label_names)]
    keys = ["eval_loss", "eval_auc", "eval_acc", *(f"eval_recall_{metric_key(name)}" for name in label_names)]
    rows = []
    for entry in state.get("log_history", []):
        if "eval_auc" in entry:
            rows.append([_fmt(entry.get("epoch"), 2), str(entry.get("step")), *(_metric(entry.get(key)) for key in keys)])
    return columns, rows


def _warnings(results: dict, label_names: list[str], from_scratch: bool, image_size: int) -> list[str]:
    notes = []
    collapsed = [name for name in label_names if results.get(f"test_recall_{metric_key(name)}") == 0.0]
    if collapsed:
        notes.append(
            f"On the test split this model never predicts {', '.join(repr(n) for n in collapsed)} (recall 0): it has "
            "collapsed towards the other class(es), whatever its accuracy says."
        )
    if from_scratch:
        notes.append(
            "This model was trained from a random initialisation (no pretrained weights)"
            + (f", at {image_size}x{image_size} input" if image_size else "")
            + ". It is a demonstration of the pipeline, not a competitive classifier."
        )
    return notes


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
    image_size = config.get("image_size") or size
    model_name = repo_id or run.resolve().name
    model_ref = repo_id or "path/to/run_folder"

    dataset_name = f"MedMNIST v2 {pretty} ({size}x{size})"
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
        tags=["image-classification", "medical-imaging", "medmnist", flag, config.get("model_type", "vision")],
        metrics=["roc_auc", "accuracy"],
        eval_results=eval_results or None,
    )

    hyperparameters = dict(results.get("hyperparameters") or {})
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
        f"random initialisation from a `{results.get('model_type') or config.get('model_type')}` config"
        + (f" (`{results['config_overrides']}`)" if results.get("config_overrides") else "")
        if from_scratch
        else f"fine-tuned from `{results.get('model_name_or_path') or base_model}`"
    )
    procedure = (
        f"Hugging Face `Trainer` (hf_medbeit's weighted-loss subclass), {init_text}; {frozen_text}; {balancing_text}"
        + (f"; layer-wise learning-rate decay {results['layer_decay']}" if results.get("layer_decay") else "")
        + ("; random crop/flip/rotation augmentation" if results.get("augment") else "; no augmentation")
        + ". The checkpoint with the best validation "
        + f"{hyperparameters.get('metric_for_best_model', 'AUC')} was kept and evaluated once on the test split."
    )

    epoch_columns, epoch_rows = _epoch_table(state, label_names)
    result_columns, result_rows = _result_table(results, label_names)
    references, reference_meta = reference_rows(flag)
    counts = results.get("train_class_counts") or []
    n_samples = info.get("n_samples", {})
    images = [
        {"alt": alt, "path": name}
        for alt, name in (("ROC curve on the test split", outputs.ROC_PLOT), ("Confusion matrix on the test split", outputs.CONFUSION_PLOT))
        if (run / name).exists()
    ]
    citations = [
        {"what": "BEiT", "bibtex": BEIT_CITATION},
        {"what": "MedMNIST v2", "bibtex": MEDMNIST_CITATION},
    ]
    if flag in SOURCE_CITATIONS:
        citations.append({"what": f"The source data set of {pretty}", "bibtex": SOURCE_CITATIONS[flag]})
    ci = results.get("test_auc_ci95")
    versions = results.get("framework_versions") or {}

    context = {
        "title": f"{model_name}: {pretty} ({size}x{size}) {_model_family(config)} classifier",
        "summary": (
            f"An image classifier for **{pretty}** ({task} task: "
            f"{', '.join(label_names)}), {init_text}, trained with hf_medbeit on the official MedMNIST v2 splits. "
            f"Test AUC {_metric(results.get('test_auc'))}, ACC {_metric(results.get('test_acc'))}."
        ),
        "warnings": _warnings(results, label_names, from_scratch, image_size),
        "architecture": _architecture(config),
        "initialisation": init_text,
        "input_description": f"RGB images resized by the image processor to {image_size}x{image_size} (grayscale is replicated to 3 channels)",
        "classes": ", ".join(f"{index}: {name}" for index, name in enumerate(label_names)),
        "total_parameters": "n/a" if results.get("total_parameters") is None else f"{results['total_parameters']:,}",
        "trainable_parameters": "n/a" if results.get("trainable_parameters") is None else f"{results['trainable_parameters']:,}",
        "dataset_pretty": pretty,
        "image_size": size,
        "test_examples": n_samples.get("test", "n/a"),
        "score_kind": "sigmoid probabilities, one per finding" if task == MULTI_LABEL_TASK else "softmax probabilities",
        "medmnist_homepage": HOMEPAGE,
        "dataset_description": info["description"],
        "dataset_license": f"{info['license']} ({LICENSE_URLS[license_id]})" if license_id else info["license"],
        "task": task,
        "split_sizes": ", ".join(f"{split} {count}" for split, count in n_samples.items()),
        "train_examples": results.get("train_examples", "n/a"),
        "train_class_counts": ", ".join(f"{name}: {count}" for name, count in zip(label_names, counts)) or "n/a",
        "data_md5": results.get("data_md5", "n/a"),
        "procedure_summary": procedure,
        "hyperparameters": hyperparameter_rows,
        "hardware": results.get("hardware", "not recorded"),
        "wall_time": _duration(results.get("wall_time_seconds")),
        "framework_versions": ", ".join(f"{name} {version}" for name, version in versions.items()) or "not recorded",
        "metric_for_best_model": hyperparameters.get("metric_for_best_model", "auc"),
        "best_step": state.get("best_global_step", "n/a"),
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
        "model_ref": model_ref,
        "citations": citations,
        "multi_label": task == MULTI_LABEL_TASK,
    }
    return card_data, context


def render_card(run_dir: str | os.PathLike, repo_id: str | None = None) -> ModelCard:
    """The model card of a finished run; ``repo_id`` names the Hub repository in the card."""
    card_data, context = card_context(run_dir, repo_id)
    return ModelCard.from_template(card_data, template_path=str(TEMPLATE), **context)


def write_card(run_dir: str | os.PathLike, repo_id: str | None = None) -> Path:
    """Render the card into ``RUN_DIR/README.md`` (atomically)."""
    path = Path(run_dir) / CARD_FILE
    card = render_card(run_dir, repo_id)
    with outputs.atomic_path(path) as temporary:
        temporary.write_text(str(card), encoding="utf-8")
    return path
