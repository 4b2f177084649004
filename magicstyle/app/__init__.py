"""The web demo (``python app.py``): upload a portrait and a style, slide beta, see the result and where the style went.

``engine.py`` holds everything that does not need a browser (the model, the inversion cache, one request from images
to PNG, heat map and timings); ``ui.py`` lays it out as a Gradio page (``handle`` is the button's handler, a plain
function tested on the tiny checkpoint without a browser); ``launch.py`` turns app.py's options into a server.
"""
from .engine import Demo, InversionCache, Request, Result

__all__ = ["Demo", "InversionCache", "Request", "Result"]
