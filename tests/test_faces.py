"""faces/: SCRFD decoding and NMS, alignment, the ONNX loading paths, and the small-face pass."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from _eval_models import FACE_ANCHOR, KPS, arcface_onnx, scrfd_onnx
from _tiny import ASTRONAUT
from conftest import ROOT, TINY_HPARAMS, TINY_WEIGHTS
from faces import ARCFACE_TEMPLATE, SCRFD, ArcFace, FaceModelError, Faces, decode, nms, norm_crop, similarity_transform
from faces.align import warp_affine
from magicstyle.smallface import crop_square, feather_mask
from faces.scrfd import anchor_centers
from magicstyle import load_config, load_model, stylize

STYLE = ROOT / "examples" / "ihc.png"


def scrfd_outputs(faces: list[tuple[int, int, int, int, float, list[float]]]) -> list[np.ndarray]:
    """Hand-made SCRFD outputs at 640: (stride, row, column, anchor, score, box distances l, t, r, b in strides)."""
    scores, boxes, kps = [], [], []
    for stride in (8, 16, 32):
        k = (640 // stride) ** 2 * 2
        scores.append(np.zeros((k, 1), np.float32))
        boxes.append(np.ones((k, 4), np.float32))
        kps.append(np.zeros((k, 10), np.float32))
    for stride, row, col, anchor, score, dist in faces:
        i, s = (row * 640 // stride + col) * 2 + anchor, (8, 16, 32).index(stride)
        scores[s][i], boxes[s][i], kps[s][i] = score, dist, np.arange(10) / 10
    return scores + boxes + kps


def test_anchor_centers_are_row_major_and_repeated_per_anchor():
    c = anchor_centers(2, 3, 8)
    assert c.tolist() == [[0, 0], [0, 0], [8, 0], [8, 0], [16, 0], [16, 0], [0, 8], [0, 8], [8, 8], [8, 8],
                          [16, 8], [16, 8]]


def test_scrfd_decoding_and_nms():
    faces = decode(scrfd_outputs([
        (8, 10, 20, 1, 0.9, [2, 3, 4, 5]),      # centre (160, 80): box (144, 56, 192, 120)
        (8, 10, 21, 0, 0.8, [2, 3, 4, 5]),      # the same face one cell on: IoU > 0.4, suppressed
        (32, 5, 5, 0, 0.7, [3, 3, 3, 3]),       # centre (160, 160): a larger face (192 px)
        (16, 30, 30, 0, 0.4, [1, 1, 1, 1]),     # below the score threshold
    ]))
    assert isinstance(faces, Faces) and len(faces) == 2
    np.testing.assert_allclose(faces.boxes, [[64, 64, 256, 256], [144, 56, 192, 120]])  # largest first
    np.testing.assert_allclose(faces.scores, [0.7, 0.9])
    np.testing.assert_allclose(faces.points[1], 8 * np.arange(10).reshape(5, 2) / 10 + [160, 80], rtol=1e-6)


def test_scrfd_nms_runs_in_the_images_pixels():
    """insightface divides by the letterbox scale before NMS, whose "+1" areas then count the image's pixels: two
    10 px boxes 4.6 px apart in the input overlap by IoU 0.41 there (one suppressed) but 0.39 in an image letterboxed
    at 1/2 (both kept)."""
    shift = 4.6 / 8  # in strides
    outputs = scrfd_outputs([(8, 10, 20, 0, 0.9, [0.625] * 4),
                             (8, 10, 20, 1, 0.8, [0.625 - shift, 0.625, 0.625 + shift, 0.625])])
    assert len(decode(outputs)) == 1
    detect = SCRFD.__new__(SCRFD)  # the detector around a stand-in session that returns these outputs
    detect.session = type("Session", (), {"run": lambda self, names, feed: outputs})()
    detect.input, detect.outputs, detect.threshold, detect.iou = "input.1", [], 0.5, 0.4
    faces = detect(Image.new("RGB", (1280, 1280), (128, 128, 128)))  # letterboxed at 1/2
    assert len(faces) == 2 and len(decode(outputs, scale=0.5)) == 2
    np.testing.assert_allclose(sorted(faces.boxes.tolist()), [[310, 150, 330, 170], [319.2, 150, 339.2, 170]],
                               rtol=1e-5)


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 4]], np.float32)
    assert nms(boxes, np.array([0.5, 0.9, 0.8, 0.7])) == [1, 2, 3]  # box 3 overlaps box 1 by 5*11/(121+55-55)<0.4


def test_similarity_transform_recovers_a_known_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, (5, 2))
    s, theta, t = 0.7, 0.4, np.array([12.0, -30.0])
    R = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    dst = src @ (s * R).T + t
    M = similarity_transform(src, dst)
    np.testing.assert_allclose(M, np.hstack([s * R, t[:, None]]), atol=1e-10)
    mirrored = similarity_transform(src, src * [-1, 1])  # no reflection: a rotation even for mirrored points
    assert np.linalg.det(mirrored[:, :2]) > 0
    assert ARCFACE_TEMPLATE.shape == (5, 2)


def test_warp_and_norm_crop():
    img = np.random.default_rng(1).integers(0, 255, (40, 50, 3)).astype(np.uint8)
    shifted = warp_affine(img, np.array([[1.0, 0, -3], [0, 1, -2]]), (20, 10))  # out[y, x] = img[y + 2, x + 3]
    np.testing.assert_array_equal(shifted, img[2:12, 3:23])
    points = ARCFACE_TEMPLATE * 2 + [10, 20]  # a face twice the template's size
    big = Image.fromarray(np.random.default_rng(2).integers(0, 255, (300, 300, 3)).astype(np.uint8))
    crop = norm_crop(big, points)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8


def test_scrfd_and_arcface_onnx_loading(tmp_path):
    detect = SCRFD(scrfd_onnx(tmp_path / "det_10g.onnx"))
    img = Image.new("RGB", (320, 200), (128, 128, 128))  # letterboxed at scale 2
    faces = detect(img)
    stride, row, col, _ = FACE_ANCHOR
    cx, cy = col * stride / 2, row * stride / 2
    np.testing.assert_allclose(faces.boxes, [[cx - 8, cy - 8, cx + 8, cy + 8]], atol=1e-4)
    np.testing.assert_allclose(faces.points[0], np.array(KPS).reshape(5, 2) * 8 + [cx, cy], atol=1e-4)
    assert len(detect(Image.new("RGB", (64, 64)))) == 0  # black: no face
    arcface = ArcFace(arcface_onnx(tmp_path / "w600k_r50.onnx"))
    e = arcface(np.stack([norm_crop(img, faces.points[0])] * 3))
    assert e.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, rtol=1e-5)


def test_letterbox_of_a_sliver():
    """An image far wider (or taller) than 640:1 still has a row (column) of pixels in the detector's input."""
    from faces.scrfd import letterbox

    for size in ((2000, 1), (1, 2000), (640, 640)):
        blob, scale = letterbox(Image.new("RGB", size, (255, 255, 255)))
        assert blob.shape == (1, 3, 640, 640) and scale > 0 and blob[0, :, 0, 0].max() > 0


def test_letterbox_resizes_as_opencv_without_antialiasing():
    """insightface resizes with cv2's INTER_LINEAR, which does not antialias: halving 0, 0, 255, 255 stripes samples
    each pair of columns at its midpoint (0 and 255 exactly); Pillow's BILINEAR averaged 4 columns (36, 191, 64, ...)."""
    from faces.scrfd import MEAN, STD, letterbox

    row = np.tile(np.array([0, 0, 255, 255], np.uint8), 320)  # 1280 columns
    blob, scale = letterbox(Image.fromarray(np.repeat(np.repeat(row[None, :, None], 1280, 0), 3, 2)))
    canvas = blob[0] * STD + MEAN  # (3, 640, 640)
    assert scale == 0.5
    np.testing.assert_allclose(canvas[:, 5, :8], np.tile([0, 255] * 4, (3, 1)), atol=1e-3)


def test_letterbox_resize_equals_cv2():
    """Optional (runs where OpenCV is installed): within one grey level of insightface's cv2.resize on a photo-sized
    image it shrinks, and the same where it enlarges."""
    cv2 = pytest.importorskip("cv2")
    from faces.scrfd import resize_bilinear

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:1024, :1536]
    wave = 128 + 60 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    img = np.clip(wave[..., None] + rng.normal(0, 20, (1024, 1536, 3)), 0, 255).astype(np.uint8)
    for src, (w, h) in ((img, (640, 426)), (img[:300, :200], (426, 640))):
        d = np.abs(resize_bilinear(src, w, h).astype(int) - cv2.resize(src, (w, h)).astype(int))
        assert d.max() <= 1 and d.mean() < 0.2, (d.max(), d.mean())


def test_missing_or_wrong_face_models(tmp_path):
    with pytest.raises(FaceModelError, match="buffalo_l.zip") as e:
        SCRFD(tmp_path / "det_10g.onnx")
    assert "\n" not in str(e.value)
    with pytest.raises(FaceModelError, match="not take"):
        ArcFace(scrfd_onnx(tmp_path / "det_10g.onnx"))


def test_scrfd_of_another_input_size_fails_when_loaded(tmp_path):
    """A detector exported for 320 x 320 (SCRFD's 9 outputs, another input): one line when made, not a traceback
    from onnxruntime at the first image."""
    from _eval_models import SCRFD_OUTPUTS, TinySCRFD, export

    path = export(TinySCRFD(), torch.zeros(1, 3, 320, 320), tmp_path / "det_320.onnx", SCRFD_OUTPUTS, batch=False)
    with pytest.raises(FaceModelError, match="does not take") as e:
        SCRFD(path)
    assert "det_10g.onnx" in str(e.value) and "\n" not in str(e.value)


def test_arcface_rejects_a_model_of_any_input_size_with_other_outputs(tmp_path):
    """insightface's det_10g.onnx takes any image size, so it passes ArcFace's input check: its outputs do not."""
    import warnings

    class TwoOutputs(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3)), x.amax((2, 3))

    path = tmp_path / "any_size.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TwoOutputs(), (torch.zeros(1, 3, 64, 64),), str(path), input_names=["x"],
                          dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}}, dynamo=False)
    with pytest.raises(FaceModelError, match="2 outputs, not ArcFace's one"):
        ArcFace(path)


def test_model_file_hash_is_the_projects_file_hash(tmp_path, monkeypatch):
    """require_file checks the SHA-256 with models/filehash.py (one file hash, remembered per file), not its own."""
    import hashlib

    from omegaconf import OmegaConf

    from faces.weights import eval_defaults, require_file
    from models import filehash

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    hashed = []
    real = filehash.hash_file
    monkeypatch.setattr(filehash, "hash_file", lambda path: (hashed.append(path), real(path))[1])
    filehash._sha256.cache_clear()
    model = tmp_path / "det_10g.onnx"
    model.write_bytes(b"onnx" * 100)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    cfg = OmegaConf.merge(eval_defaults(), {"models": {"scrfd": {"file": str(model), "sha256": digest[:8]}}})
    assert require_file(None, "scrfd", cfg) == model and require_file(None, "scrfd", cfg) == model
    assert len(hashed) == 1  # hashed once, by filehash
    cfg.models.scrfd.sha256 = "0" * 8
    with pytest.raises(FaceModelError, match="wrong SHA-256"):
        require_file(None, "scrfd", cfg)
    filehash._sha256.cache_clear()


# ---------------------------------------------------------------------------------------------------------------------
# The small-face pass


def test_crop_square_and_mask():
    assert crop_square(np.array([10, 10, 20, 30]), 0.5, 100) == (0.0, 0.0, 40.0)  # moved inside the image
    assert crop_square(np.array([40, 40, 50, 50]), 0.5, 100) == (35.0, 35.0, 20.0)
    m = feather_mask(20, 0.25)
    assert m.max() == 1.0 and m[0, 0] < 0.2 and m[10, 10] == 1.0


TINY = {"size": 64, "steps": 2, "model": {"weights": str(TINY_WEIGHTS), "hparams": str(TINY_HPARAMS),
                                          "dtype": "float32", "device": "cpu"}}


def stub_detector(box):
    def detect(img: Image.Image) -> Faces:
        return Faces(np.array([box], np.float32), np.array([0.9], np.float32), np.zeros((1, 5, 2), np.float32))
    return detect


def test_small_face_pass_changes_only_the_pasted_square(monkeypatch):
    import magicstyle.smallface

    sd = load_model(load_config(None, TINY))
    plain = np.asarray(stylize(ASTRONAUT, STYLE, TINY, sd=sd))
    side = min(Image.open(ASTRONAUT).size)
    monkeypatch.setattr(magicstyle.smallface, "load_detector", lambda cfg: stub_detector([0.4 * side, 0.3 * side,
                                                                                  0.55 * side, 0.45 * side]))
    stats: dict = {}
    refined = np.asarray(stylize(ASTRONAUT, STYLE, {**TINY, "face": {"refine": True}}, sd=sd, stats=stats))
    info = stats["face_refine"]
    assert info["ran"] and 0 < info["face_share"] < 0.1
    x0, y0, x1, y1 = info["box"]
    assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and x1 - x0 == y1 - y0
    inside = np.zeros(plain.shape[:2], bool)
    inside[y0:y1, x0:x1] = True
    np.testing.assert_array_equal(refined[~inside], plain[~inside])  # the rest: bit for bit the plain run
    assert np.abs(refined[inside].astype(int) - plain[inside]).mean() > 1.0

    monkeypatch.setattr(magicstyle.smallface, "load_detector",
                        lambda cfg: stub_detector([0, 0, 0.8 * side, 0.8 * side]))
    stats = {}
    large = np.asarray(stylize(ASTRONAUT, STYLE, {**TINY, "face": {"refine": True}}, sd=sd, stats=stats))
    assert not stats["face_refine"]["ran"] and "covers" in stats["face_refine"]["reason"]
    np.testing.assert_array_equal(large, plain)


def test_small_face_pass_without_detector_fails_before_the_model_loads(tmp_path):
    cfg = {**TINY, "model": {**TINY["model"], "weights": str(tmp_path / "absent.safetensors")},
           "face": {"refine": True, "detector": str(tmp_path / "det_10g.onnx")}}
    with pytest.raises(FaceModelError, match="scrfd model file"):
        stylize(ASTRONAUT, STYLE, cfg)


@pytest.mark.parametrize("detector", ["missing", "damaged"])
def test_cli_small_face_pass_without_detector(tmp_path, capsys, detector):
    import train_free_run
    from _tiny import write_config

    if detector == "damaged":  # a download cut short: onnxruntime cannot parse it
        (tmp_path / "det.onnx").write_bytes(b"\x08\x07\x12\x04onnx")
    config = write_config(tmp_path / "run.yaml", extra=f"face:\n  refine: true\n  detector: {tmp_path}/det.onnx\n")
    output = tmp_path / "out.png"
    code = train_free_run.main(["--content", str(ASTRONAUT), "--style", str(STYLE), "--config", str(config),
                                "--output", str(output), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "buffalo_l" in err and "face.detector" in err
    assert not output.exists()
