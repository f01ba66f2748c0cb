"""The model card of a pre-training run (``hf-medbeit pretrain``): what the encoder is, what it
was pre-trained on and how, and how to fine-tune it. ``cards.render_card``/``cards.write_card``
render it with ``huggingface_hub.ModelCard`` from ``model_cards/pretraining_card_template.md`` when
the run folder is a pre-training run; every figure comes from the run folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import ModelCardData
from medmnist import INFO

from . import outputs
from .cards import CITATIONS, MODEL_CARDS_DIR, hub_license

TEMPLATE = MODEL_CARDS_DIR / "pretraining_card_template.md"
OBJECTIVES = {
    "tokens": "BEiT's masked image modeling: cross-entropy over the visual tokens of the masked patches, with a "
              "visual vocabulary of {codebook_size} k-means centroids fitted on the pre-training images' patches",
    "pixels": "SimMIM/MAE-style masked image modeling: L1 regression of the masked patches' pixels, each patch "
              "normalised to zero mean and unit variance",
}


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise outputs.UnreadableResults(path.parent, f"{path.name} cannot be read ({error})") from error


def _duration(seconds) -> str:
    if not seconds:
        return "an unrecorded time"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else (f"{minutes} min {secs} s" if minutes else f"{secs} s")


def pretraining_card_context(run_dir: str | os.PathLike, repo_id: str | None = None) -> tuple[ModelCardData, dict]:
    run = Path(run_dir)
    results = outputs.read_results(run, kind="pretrain")
    config = _read(run / "config.json")
    state = _read(run / "trainer_state.json") if (run / "trainer_state.json").exists() else {}
    medmnist_flags = [source["name"] for source in results["sources"] if source["kind"] == "medmnist"]
    licenses = sorted({INFO[flag]["license"] for flag in medmnist_flags})
    hub_licenses = {hub_license(name) for name in licenses}
    table = json.loads(CITATIONS.read_text())
    cited = [table["architectures"]["beit"], table["benchmark"]] if "beit" in table["architectures"] else [table["benchmark"]]
    cited += [{"what": f"The source data set of {INFO[flag]['python_class']}", "bibtex": table["source_datasets"][flag]}
              for flag in medmnist_flags if flag in table["source_datasets"]]
    card_data = ModelCardData(
        library_name="transformers",
        license=hub_licenses.pop() if len(hub_licenses) == 1 and None not in hub_licenses else "other",
        tags=["medical-imaging", "medmnist", "beit", "masked-image-modeling", "self-supervised", "hf_medbeit"],
        pipeline_tag="image-feature-extraction",
    )
    hyperparameters = results.get("hyperparameters", {})
    context = {
        "title": f"BEiT pre-trained by masked image modeling on {', '.join(source['name'] for source in results['sources'])}",
        "model_ref": repo_id or str(run),
        "architecture": f"BEiT, {config['num_hidden_layers']} layers, hidden size {config['hidden_size']}, "
                        f"{config['num_attention_heads']} heads (`BeitForMaskedImageModeling`)",
        "image_size": results["image_size"],
        "patch_size": results["patch_size"],
        "total_parameters": f"{results['total_parameters']:,}",
        "objective": OBJECTIVES[results["mim_target"]].format(codebook_size=results.get("codebook_size")),
        "masking": f"{'block-wise (BEiT)' if results['masking'] == 'block' else 'uniformly random'}, "
                   f"{results['mask_ratio']:.0%} of the patches",
        "augmentation": "random resized crop and horizontal flip" if results.get("augment") else "none",
        "images_per_epoch": f"{results['images_per_epoch']:,}",
        "channels": "grayscale" if results.get("channels") == 1 else "RGB",
        "sources": results["sources"],
        "medmnist_sources": medmnist_flags,
        "medmnist_licenses": ", ".join(licenses),
        "hyperparameters": list(hyperparameters.items()),
        "final_loss": f"{results['final_loss']:.4f}" if results.get("final_loss") is not None else "(not logged)",
        "epochs": f"{state.get('epoch', hyperparameters.get('num_train_epochs', 0)):g}",
        "steps": state.get("global_step", "?"),
        "wall_time": _duration(results.get("wall_time_seconds")),
        "hardware": results.get("hardware", "unrecorded hardware"),
        "codebook": results["mim_target"] == "tokens",
        "citations": cited,
    }
    return card_data, context
