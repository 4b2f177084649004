"""The Gradio page of the demo: inputs, the Stylize button, the result, the heat map and the timings.

``handle`` is the button's handler, a plain function of the page's values (tested without a browser); ``build``
lays out the page; ``serve`` loads the model once and serves the page until interrupted.  Requests run one at a time
(the queue's concurrency limit 1, and the engine's lock); bad input becomes a message in the page.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo

import gradio as gr  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from attention import RECIPES  # noqa: E402
from models.errors import MagicStyleError  # noqa: E402

from .engine import Demo, Request, Result  # noqa: E402

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"  # the checkout's; an installed wheel has none
EXAMPLES = [("astronaut.png", "ihc.png"), ("grace_hopper.jpg", "hubble_deep_field.jpg")]
MAX_UPLOAD = "64mb"
HEIGHT = 320  # pixels, images in the page
CSS = "#result img {width: 100%; height: 100%; object-fit: contain}"  # small results fill the frame
QUEUE_SIZE = 16  # requests waiting beyond this are turned away with a message


def image_input(label: str, elem_id: str) -> gr.Image:
    """An image input (upload, webcam, clipboard) whose unreadable uploads become a message in the page instead of a
    bare "Error".  (Its ``preprocess`` is wrapped on the instance: a subclass of a Gradio component would make Gradio
    write a type stub beside this file.)"""
    image = gr.Image(label=label, sources=["upload", "webcam", "clipboard"], type="filepath", image_mode=None,
                     height=HEIGHT, elem_id=elem_id)
    preprocess = image.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise gr.Error(f"{label}: cannot read this file as an image ({e}); use a PNG, JPEG or WebP file",
                           print_exception=False) from None

    image.preprocess = checked
    return image


def handle(demo: Demo, content, style, recipe, beta, steps, guidance, prompt, seed, store_mode, heatmap,
           face_refine=None, progress=None) -> tuple[str, Image.Image | None, str]:
    """The Stylize button: the page's values -> (PNG path for the result image, heat map, timings as Markdown).

    ``progress`` is Gradio's progress tracker (or None): it gets one bar per phase.  Bad input raises ``gr.Error``,
    which the page shows while the app keeps serving.
    """
    request = Request(
        content=content, style=style, recipe=recipe, beta=_number(beta, float), steps=_number(steps, int),
        guidance=_number(guidance, float), prompt=prompt, seed=_number(seed, int), store_mode=store_mode,
        heatmap=bool(heatmap), face_refine=None if face_refine is None else bool(face_refine),
    )
    callback = None
    if progress is not None:
        def callback(phase: str, done: int, total: int) -> None:
            progress((done, total), desc=phase, unit="steps")
    try:
        result = demo.run(request, callback)
    except MagicStyleError as e:
        raise gr.Error(str(e), print_exception=False) from None
    return str(result.png), result.heatmap, timings_markdown(result)


def _number(value, kind):
    """A number from the page (sliders and number boxes send floats); a non-integral "integer" is left for the
    configuration check to refuse with its message."""
    if value is None or value == "":
        return None
    value = float(value)
    return int(value) if kind is int and value.is_integer() else value


def timings_markdown(result: Result) -> str:
    """The phase timings and UNet rows of one request, as a Markdown table."""
    rows = ["| phase | seconds | UNet rows |", "| --- | ---: | ---: |"]
    for phase, seconds in result.seconds.items():
        unet = result.unet_rows.get(phase, "")
        rows.append(f"| {phase} | {seconds:.2f} | {unet} |")
    rows.append(f"| **total** | **{sum(result.seconds.values()):.2f}** | {sum(result.unet_rows.values())} |")
    if result.attention is not None:
        mean = result.attention["mean"]
        share = "none (this recipe reports no attention shares)" if mean is None else f"{mean:.3f}"
        rows.insert(0, f"Mean attention share on the style image's tokens: **{share}**\n")
    if result.face is not None:
        face = result.face
        rows.append(f"\nSmall-face pass: {'ran, box ' + str(tuple(face['box'])) if face['ran'] else 'not run'}"
                    f" ({face['reason']}).")
    if len(result.reused) == 2:
        note = "Both inversions were reused: only FFF ran."
    elif result.reused:
        note = f"The {result.reused[0]} image's inversion was reused: CSDI inverted the other one only."
    else:
        note = "Both images were inverted (CSDI); changing only beta, recipe, prompt or guidance will reuse them."
    return "\n".join(rows) + "\n\n" + note


def build(demo: Demo) -> gr.Blocks:
    cfg = demo.cfg
    with gr.Blocks(title="MagicStyle", analytics_enabled=False) as page:
        gr.Markdown("## MagicStyle: paint a portrait in the style of a reference image\n"
                    "CSDI inverts both images and keeps their self-attention features; FFF generates with Feature "
                    "Fusion Attention. beta weighs the generated query against the content query (alpha = 1 - beta).")
        with gr.Row():
            content = image_input("content image", "content")
            style = image_input("style image", "style")
        examples = [[str(EXAMPLES_DIR / c), str(EXAMPLES_DIR / s)] for c, s in EXAMPLES]
        if all(Path(f).is_file() for pair in examples for f in pair):
            gr.Examples(examples, inputs=[content, style], label="examples")
        with gr.Row():
            beta = gr.Slider(0.0, 1.0, value=cfg.ffa.beta, step=0.05, label="beta (alpha = 1 - beta)")
            recipe = gr.Dropdown(list(RECIPES), value=cfg.ffa.recipe, label="recipe (attention in the chosen layers)")
        with gr.Accordion("more settings", open=False):
            with gr.Row():
                steps = gr.Slider(1, 100, value=cfg.steps, step=1, label="DDIM steps")
                guidance = gr.Slider(0.0, 15.0, value=cfg.generation.guidance, step=0.5, label="guidance")
                seed = gr.Number(value=cfg.seed, precision=0, label="seed (used with inversion.sample_posterior)")
            with gr.Row():
                prompt = gr.Textbox(value=cfg.generation.prompt, label="prompt")
                store_mode = gr.Radio(["memory", "recompute"], value=cfg.store.mode, label="feature store")
                heatmap = gr.Checkbox(value=True, label="attention diagnostics (heat map)")
                face_refine = gr.Checkbox(value=cfg.face.refine, label="small-face pass (needs the face detector)")
        button = gr.Button("Stylize", variant="primary", elem_id="run")
        with gr.Row():
            result = gr.Image(label="result (the download keeps the PNG's parameters)", type="filepath",
                              format="png", interactive=False, height=HEIGHT, buttons=["download", "fullscreen"],
                              elem_id="result")
            heat = gr.Image(label="where the style went: attention share on style tokens, per layer and step",
                            type="pil", format="png",
                            interactive=False, height=HEIGHT, buttons=["download", "fullscreen"], elem_id="heatmap")
        timings = gr.Markdown(elem_id="timings")

        def stylize(content, style, recipe, beta, steps, guidance, prompt, seed, store_mode, heatmap, face_refine,
                    progress=gr.Progress()):
            return handle(demo, content, style, recipe, beta, steps, guidance, prompt, seed, store_mode, heatmap,
                          face_refine, progress)

        inputs = [content, style, recipe, beta, steps, guidance, prompt, seed, store_mode, heatmap, face_refine]
        button.click(stylize, inputs, [result, heat, timings], concurrency_limit=1, api_name="stylize")
    page.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return page


def serve(demo: Demo, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    """Serve the page until interrupted (Ctrl-C)."""
    build(demo).launch(
        server_name=host, server_port=port, share=share, show_error=True, ssr_mode=False, max_file_size=MAX_UPLOAD,
        allowed_paths=[str(EXAMPLES_DIR), str(demo.out_dir)], footer_links=[], css=CSS,
    )


__all__ = ["build", "handle", "serve", "timings_markdown"]
