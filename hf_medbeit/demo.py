"""``hf-medbeit demo``: a web page to try a model on your own images (Gradio).

    hf-medbeit demo --model runs/quickstart-breastmnist-tiny-beit          # http://127.0.0.1:7860
    hf-medbeit demo --model user/beit-breastmnist --write-space space/      # app.py + requirements.txt

Drop an image file (or pick one of the run's own test images): the page shows the class
probabilities (the same numbers ``hf-medbeit predict`` gives: the same reading, processor and
model, from ``hf_medbeit.inference``) and the heat map of the chosen method (``hf_medbeit.explain``).
A file that is not an image gets a message on the page, not a stack trace.

``--write-space DIR`` writes a Hugging Face Space (Gradio SDK) instead of serving: ``app.py``,
``requirements.txt``, a ``README.md`` with the Space's settings, a copy of this package (it is not
on PyPI) and, for a run folder, the model's files (a Hub id is loaded from the Hub by the Space).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from .errors import UserError
from .inference import IMAGE_ERRORS, Classifier, check_model_reference, load_classifier, load_image, resolve_device

SCORES_ID = "scores"  # the element holding the exact scores, one "name: value" line per class
MESSAGE_ID = "message"
DISPLAY_SIZE = 256  # heat maps are enlarged (by pixel repetition) to at least this many pixels
MODEL_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def _require_gradio():
    try:
        import gradio
    except ImportError:
        raise UserError("hf-medbeit demo needs Gradio; install it with: pip install 'hf_medbeit[demo]'") from None
    return gradio


def overlay(shown: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image (H, W, 3; 0..1) with the heat map (H, W; 0..1) in the jet colour map, enlarged by
    pixel repetition to at least DISPLAY_SIZE pixels (the pixels of a 28x28 image stay visible)."""
    from matplotlib import colormaps

    coloured = colormaps["jet"](heat)[..., :3]
    blended = (1 - alpha) * shown + alpha * coloured
    factor = max(1, int(np.ceil(DISPLAY_SIZE / max(shown.shape[:2]))))
    blended = np.repeat(np.repeat(blended, factor, axis=0), factor, axis=1)
    return np.clip(np.rint(blended * 255), 0, 255).astype(np.uint8)


def format_scores(names: list[str], scores: np.ndarray) -> str:
    return "\n\n".join(f"{name}: {score:.6f}" for name, score in zip(names, scores))


class DemoModel:
    """What the page calls: an image file -> (probabilities, heat map, scores text, message)."""

    def __init__(self, classifier: Classifier):
        from PIL import Image

        from .explain import find_structure, processor_inputs

        self.classifier = classifier
        blank = processor_inputs(classifier, [Image.new("RGB", (32, 32))])
        self.methods = list(find_structure(classifier.model, blank).methods)

    def analyse(self, path, method: str | None = None):
        from .explain import Item, explain_items

        if not path:
            return None, None, "", "Drop an image file above, or pick an example."
        name = Path(path).name
        try:
            image = load_image(path)
        except IMAGE_ERRORS as error:
            detail = str(error).splitlines()[0] if str(error) else type(error).__name__
            return None, None, "", (f"**{name} is not an image this page can read** ({detail}). "
                                    "Upload a PNG, JPEG, TIFF, BMP or another image file.")
        method = method if method in self.methods else self.methods[0]
        explained = explain_items(self.classifier, [Item(Path(name).stem, name, image)], [method], sanity=False)
        scores = explained.scores[0]
        names = explained.label_names
        target = names[int(explained.targets[0])]
        return ({name: float(score) for name, score in zip(names, scores)},
                overlay(explained.shown[0], explained.maps[method][0]),
                format_scores(names, scores),
                f"{name}: {method} heat map for **{target}** (the top class).")


def build_app(demo_model: DemoModel, title: str, examples: list[str] | None = None):
    gr = _require_gradio()
    from .explain import METHODS

    classifier = demo_model.classifier
    with gr.Blocks(title=title) as app:
        gr.Markdown(f"# {title}\n{len(classifier.label_names)} classes: "
                    + ", ".join(classifier.label_names)
                    + ". Research use only: not a medical device.")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Image file (drop or click)", file_count="single", type="filepath", elem_id="upload")
                method = gr.Radio([(METHODS[m], m) for m in demo_model.methods], value=demo_model.methods[0],
                                  label="Heat map", elem_id="method")
                if examples:
                    gr.Examples(examples=[[path] for path in examples], inputs=[upload], label="Or pick a test image")
            with gr.Column():
                label = gr.Label(label="Class probabilities", num_top_classes=len(classifier.label_names))
                heat = gr.Image(label="Where the model looks", type="numpy", elem_id="heatmap")
                scores = gr.Markdown(elem_id=SCORES_ID)
                message = gr.Markdown(elem_id=MESSAGE_ID)
        outputs = [label, heat, scores, message]
        upload.change(demo_model.analyse, inputs=[upload, method], outputs=outputs)
        method.change(demo_model.analyse, inputs=[upload, method], outputs=outputs)
    return app


def _example_images(run: Path, folder: Path, per_class: int = 1) -> list[str]:
    """A few of the run's own test images (one right and one wrong per class) as PNGs in ``folder``."""
    from .explain import run_test_items

    try:
        items = run_test_items(run, per_class, None, False)
    except UserError:
        return []  # a model folder without the run's data: no examples, the page still works
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for item in items:
        path = folder / f"{item.name}_{'_'.join(item.truth).replace(' ', '').replace(',', '')}.png"
        item.image.save(path)
        paths.append(str(path))
    return paths


def serve(model_ref: str, device: str | None = None, revision: str | None = None, host: str = "127.0.0.1",
          port: int | None = None, block: bool = True, examples_dir: str | None = None):
    """Load the model and start the page; returns (app, url). ``block=False`` for tests."""
    _require_gradio()
    local = check_model_reference(model_ref)
    classifier = load_classifier(model_ref, device=device, revision=revision, attn_implementation="eager")
    examples = []
    if local is not None:
        examples = _example_images(local, Path(examples_dir or tempfile.mkdtemp(prefix="hf_medbeit_demo_")))
    elif examples_dir and Path(examples_dir).is_dir():
        examples = sorted(str(path) for path in Path(examples_dir).glob("*.png"))
    title = f"{Path(model_ref).name if local is not None else model_ref}"
    app = build_app(DemoModel(classifier), title, examples)
    _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=not block,
                           allowed_paths=[str(Path(path).parent) for path in examples[:1]])
    return app, url


# ---------------------------------------------------------------------------------------------
# A Hugging Face Space
# ---------------------------------------------------------------------------------------------

APP_TEMPLATE = '''"""A Hugging Face Space written by `hf-medbeit demo --write-space`: the hf-medbeit demo page."""

from hf_medbeit.demo import serve

serve({model!r}, host="0.0.0.0", port=7860, examples_dir="examples")
'''

SPACE_README = """---
title: {title}
emoji: 🩺
colorFrom: blue
colorTo: gray
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
---

Try **{model}** on your own images: class probabilities and where the model looks (Grad-CAM, and
attention maps for ViT/BEiT). Research use only: not a medical device. Written by
`hf-medbeit demo --model {source} --write-space`.
"""


def space_requirements() -> list[str]:
    """hf_medbeit's own dependencies (from its installed metadata) and Gradio, at this version."""
    requirements = [requirement for requirement in importlib.metadata.requires("hf_medbeit") or []
                    if "extra ==" not in requirement]
    requirements.append(f"gradio=={importlib.metadata.version('gradio')}")
    return requirements


def write_space(model_ref: str, folder: str | os.PathLike) -> Path:
    """A Space folder for ``model_ref``, built beside ``folder`` and renamed into place."""
    gradio = _require_gradio()
    target = Path(folder)
    if target.exists():
        raise UserError(f"--write-space {target} already exists; pass a new folder")
    local = check_model_reference(model_ref)
    if local is not None:
        missing = [name for name in MODEL_FILES if not (local / name).is_file()]
        if missing:
            raise UserError(f"--model {model_ref} lacks {', '.join(missing)}; pass a finished run folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        package = Path(__file__).resolve().parent
        shutil.copytree(package, staging / "hf_medbeit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        if local is not None:
            (staging / "model").mkdir()
            for name in MODEL_FILES:
                shutil.copy2(local / name, staging / "model" / name)
            _example_images(local, staging / "examples")
        space_model = "model" if local is not None else model_ref
        (staging / "app.py").write_text(APP_TEMPLATE.format(model=space_model))
        (staging / "requirements.txt").write_text("\n".join(space_requirements()) + "\n")
        (staging / "README.md").write_text(SPACE_README.format(
            title=(Path(model_ref).name if local is not None else model_ref.split("/")[-1])[:30],
            gradio_version=gradio.__version__, model=model_ref, source=model_ref), encoding="utf-8")
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-medbeit demo",
        description="A web page (Gradio) to try a model on your own images: class probabilities and a heat map; "
        "or, with --write-space, the files of a Hugging Face Space that serves it.",
    )
    parser.add_argument("--model", required=True, help="Run folder or Hub repository id (USER/NAME).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to serve on (0.0.0.0: every interface).")
    parser.add_argument("--port", type=int, default=None, help="Port (default: Gradio's, 7860 or the next free one).")
    parser.add_argument("--write-space", "--write_space", dest="write_space", default=None, metavar="DIR",
                        help="Write a Hugging Face Space (app.py, requirements.txt, README.md) into DIR and exit.")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available).")
    parser.add_argument("--revision", default=None, help="Branch, tag or commit of a Hub repository.")
    return parser


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    if args.port is not None and not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port number; pass one from 1 to 65535")
    if args.write_space:
        written = write_space(args.model, args.write_space)
        print(f"hf-medbeit: wrote a Space in {written}; publish it with: "
              f"hf upload USER/SPACE {written} --repo-type space", file=sys.stderr)
        return written
    device = resolve_device(args.device)
    return serve(args.model, device=device, revision=args.revision, host=args.host, port=args.port)
