"""Small random-weight models in the real file formats of the metric and face models (no real weights in tests)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

SCRFD_OUTPUTS = ["448", "471", "494", "451", "474", "497", "454", "477", "500"]  # det_10g.onnx's output names
ARCFACE_OUTPUT = "683"  # w600k_r50.onnx's output name
FACE_ANCHOR = (16, 20, 20, 0)  # the tiny detector's one face: stride, row, column, anchor
KPS = [-0.6, -0.4, 0.6, -0.4, 0.0, 0.1, -0.5, 0.6, 0.5, 0.6]  # its 5 points, offsets from the centre in strides


class TinySCRFD(nn.Module):
    """SCRFD's input and outputs at 640 x 640: one face (a box of 2 strides around FACE_ANCHOR's centre) whose score
    is high on ordinary images and low on dark ones (its logit grows with the mean input)."""

    def __init__(self):
        super().__init__()
        for stride in (8, 16, 32):
            k = (640 // stride) ** 2 * 2
            logits = torch.full((k, 1), -20.0)
            if stride == FACE_ANCHOR[0]:
                logits[(FACE_ANCHOR[1] * 640 // stride + FACE_ANCHOR[2]) * 2 + FACE_ANCHOR[3]] = 4.0
            self.register_buffer(f"logits{stride}", logits)
            self.register_buffer(f"kps{stride}", torch.tensor(KPS).expand(k, 10).clone())

    def forward(self, x):
        brightness = x.mean() * 8.0  # about -8 for a black image, 0 for mid grey
        scores = [torch.sigmoid(getattr(self, f"logits{s}") + brightness) for s in (8, 16, 32)]
        boxes = [torch.full_like(getattr(self, f"kps{s}")[:, :4], 1.0) + 0 * brightness for s in (8, 16, 32)]
        kps = [getattr(self, f"kps{s}") + 0 * brightness for s in (8, 16, 32)]
        return (*scores, *boxes, *kps)


class TinyArcFace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 8, stride=8)
        self.fc = nn.Linear(4 * 14 * 14, 512)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def export(model: nn.Module, example: torch.Tensor, path: Path, outputs: list[str], batch: bool) -> Path:
    """torch.onnx.export (the TorchScript exporter), then the real, numeric output names (which it refuses)."""
    import onnx

    temporary = [f"output_{name}" for name in outputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), input_names=["input.1"], output_names=temporary,
                          dynamic_axes={"input.1": {0: "None"}} if batch else None, dynamo=False)
    graph = onnx.load(str(path))
    rename = dict(zip(temporary, outputs))
    for node in graph.graph.node:
        node.output[:] = [rename.get(o, o) for o in node.output]
    for output in graph.graph.output:
        output.name = rename[output.name]
    onnx.save(graph, str(path))
    return path


def scrfd_onnx(path: Path) -> Path:
    return export(TinySCRFD(), torch.zeros(1, 3, 640, 640), path, SCRFD_OUTPUTS, batch=False)


def arcface_onnx(path: Path) -> Path:
    torch.manual_seed(0)
    return export(TinyArcFace(), torch.zeros(1, 3, 112, 112), path, [ARCFACE_OUTPUT], batch=True)


TINY_CLIP = {
    "embed_dim": 32, "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def open_clip_model(folder: Path) -> tuple[str, Path]:
    """A tiny open_clip model config registered by name, and its weights as open_clip_model.safetensors."""
    import open_clip
    from safetensors.torch import save_file

    config = folder / "tiny-clip-test.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip-test")
    path = folder / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return "tiny-clip-test", path


def timm_vit(path: Path, name: str = "vit_tiny_patch16_224") -> Path:
    """A timm ViT state dict (DINO's layout: no classifier head) as .safetensors."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def inception_state_dict(path: Path) -> Path:
    from metrics.fid import FIDInception

    torch.manual_seed(0)
    torch.save(FIDInception().state_dict(), path)
    return path


def art_inception_state_dict(path: Path, classes: tuple[int, int] = (7, 5)) -> Path:
    """A random state dict in the layout of ArtFID's ``art_inception.pth``, made from torchvision's ``Inception3``
    (not from our class): its ``fc`` and ``AuxLogits`` heads become ArtFID's two, ``fc1``/``AuxLogits1`` with
    ``classes[0]`` outputs and ``fc2``/``AuxLogits2`` with ``classes[1]``.  Convolutions get He-normal weights so that
    activations stay O(1) through the 94 layers (features worth comparing)."""
    from torchvision.models import Inception3

    torch.manual_seed(0)
    model = Inception3(num_classes=max(classes), aux_logits=True, init_weights=False)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0, (2 / m.weight[0].numel()) ** 0.5)
    state = {}
    for key, value in model.state_dict().items():
        head = "fc." if key.startswith("fc.") else "AuxLogits." if key.startswith("AuxLogits.") else None
        if head is None:
            state[key] = value
            continue
        for n, rows in zip("12", classes):
            classifier = key.startswith(("fc.", "AuxLogits.fc."))
            state[head[:-1] + n + key[len(head) - 1:]] = value[:rows] if classifier else value
    torch.save(state, path)
    return path


def lpips_files(folder: Path) -> tuple[Path, Path]:
    """torchvision AlexNet weights (only ``features.*``, to stay small) and LPIPS v0.1 linear layers."""
    from torchvision.models import alexnet

    torch.manual_seed(0)
    features = {f"features.{k}": v for k, v in alexnet(weights=None).features.state_dict().items()}
    torch.save(features, folder / "alexnet-owt-7be5be79.pth")
    linear = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(linear, folder / "alex.pth")
    return folder / "alexnet-owt-7be5be79.pth", folder / "alex.pth"


def eval_models(folder: Path) -> list[str]:
    """All of them, as ``key=value`` overrides of configs/eval.yaml (hashes off: these are not the real files)."""
    name, clip = open_clip_model(folder)
    alex, lin = lpips_files(folder)
    files = {
        "clip": clip, "dino": timm_vit(folder / "model.safetensors"), "scrfd": scrfd_onnx(folder / "det_10g.onnx"),
        "arcface": arcface_onnx(folder / "w600k_r50.onnx"),
        "fid_inception": inception_state_dict(folder / "pt_inception-2015-12-05-6726825d.pth"),
        "lpips_alexnet": alex, "lpips_linear": lin,
    }
    overrides = [f"models.clip.name={name}", "models.dino.name=vit_tiny_patch16_224", "device=cpu"]
    for key, path in files.items():
        overrides += [f"models.{key}.file={path}", f"models.{key}.sha256=null"]
    return overrides
