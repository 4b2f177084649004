"""metrics/ and evaluate.py: FID closed forms, the model loading paths in their real formats, a whole evaluation."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as evaluate_cli
from _eval_models import art_inception_state_dict, eval_models, inception_state_dict, lpips_files, open_clip_model, \
    timm_vit
from metrics import FIDInception, fid_between, frechet_distance, gaussian, load_art_inception, load_inception, \
    load_lpips, run_evaluation
from metrics import features as features_module
from metrics.report import csv_text, markdown, sweep_lines

# ---------------------------------------------------------------------------------------------------------------------
# FID


def test_frechet_distance_is_zero_for_identical_gaussians():
    x = np.random.default_rng(0).normal(size=(50, 6))
    mu, sigma = gaussian(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_closed_forms():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    # diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2
    want = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-9)
    # the same covariances seen in a rotated basis (Tr is invariant): (S1 S2)^(1/2) is not diagonal there
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    got = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(want, rel=1e-7)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    one_d = frechet_distance(np.array([3.0]), np.array([[4.0]]), np.array([1.0]), np.array([[1.0]]))
    assert one_d == pytest.approx(5.0)


def test_frechet_distance_is_symmetric():
    rng = np.random.default_rng(2)
    g1, g2 = gaussian(rng.normal(size=(40, 5))), gaussian(rng.normal(size=(40, 5)) * 2 + 1)
    assert frechet_distance(*g1, *g2) == pytest.approx(frechet_distance(*g2, *g1), rel=1e-6)


def test_frechet_distance_with_singular_covariances(monkeypatch):
    # singular products whose root is finite (SciPy warns): no eps offset, as pytorch-fid; exact closed forms
    # (0 product: 1 + 1 - 0 = 2; diag(4, 0) product: 1 + 5 - 2 * 2 = 2; an offset gives 1.996 and 1.998)
    assert frechet_distance(np.zeros(2), np.diag([1.0, 0.0]), np.zeros(2), np.diag([0.0, 1.0])) == 2.0
    assert frechet_distance(np.zeros(2), np.diag([1.0, 0.0]), np.zeros(2), np.diag([4.0, 1.0])) == \
        pytest.approx(2.0, rel=1e-12)
    # a root that is not finite: the offset, and the root taken again
    import metrics.fid

    calls, sqrtm = [], metrics.fid.linalg.sqrtm
    monkeypatch.setattr(metrics.fid.linalg, "sqrtm", lambda a: calls.append(a.copy()) or (
        np.full_like(a, np.inf) if len(calls) == 1 else sqrtm(a)))
    d = frechet_distance(np.zeros(2), np.diag([1.0, 0.0]), np.zeros(2), np.diag([0.0, 1.0]))
    offset = 1e-6 * np.eye(2)
    np.testing.assert_allclose(calls[1], (np.diag([1.0, 0.0]) + offset) @ (np.diag([0.0, 1.0]) + offset))
    assert d == pytest.approx(2.0, abs=1e-2) and d != 2.0
    # fewer images than dimensions (the usual case for a few hundred images in 2048 dimensions)
    rng = np.random.default_rng(3)
    value = fid_between(rng.normal(size=(5, 20)), rng.normal(size=(6, 20)) + 1)
    assert np.isfinite(value) and value > 0
    assert fid_between(rng.normal(size=(1, 20)), rng.normal(size=(6, 20))) is None


# ---------------------------------------------------------------------------------------------------------------------
# Loading paths, in the real formats


def test_fid_inception_state_dict_has_the_real_keys(tmp_path):
    keys = FIDInception().state_dict()
    for key in ("Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_var", "Mixed_5b.branch_pool.conv.weight",
                "Mixed_6e.branch7x7dbl_5.bn.bias", "Mixed_7c.branch3x3dbl_3b.conv.weight", "fc.weight"):
        assert key in keys
    assert keys["fc.weight"].shape == (1008, 2048) and not any(k.startswith("AuxLogits") for k in keys)
    model = load_inception(inception_state_dict(tmp_path / "pt_inception-2015-12-05-6726825d.pth"))
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 80)).shape == (2, 2048)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(Exception, match="not an FID Inception"):
        load_inception(tmp_path / "other.pth")


@pytest.fixture(scope="module")
def art_file(tmp_path_factory):
    return art_inception_state_dict(tmp_path_factory.mktemp("art") / "art_inception.pth")


def test_art_inception_loads_artfids_layout_strictly(art_file, models, tmp_path):
    """ArtFID's file (two heads fc1/fc2, AuxLogits1/2, class counts from the file) loads; a key short or another
    network's file is one line, and FID's loader refuses ArtFID's file (it is not FID's network)."""
    model = load_art_inception(art_file)
    assert model.fc1.out_features == 7 and model.fc2.out_features == 5
    with torch.no_grad():
        assert model(torch.rand(2, 3, 80, 96)).shape == (2, 2048)
    state = torch.load(art_file)
    del state["fc2.bias"]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(Exception, match="not ArtFID's Inception-v3 state dict .missing key fc2.bias"):
        load_art_inception(tmp_path / "short.pth")
    with pytest.raises(Exception, match="not ArtFID's Inception-v3 state dict .missing key AuxLogits1"):
        load_art_inception(next(o.split("=", 1)[1] for o in models if o.startswith("models.fid_inception.file=")))
    with pytest.raises(Exception, match="not an FID Inception"):
        load_inception(art_file)


def test_art_inception_preprocessing_is_styleids():
    """Shorter side to 512 (torchvision's Resize(512)), then [0, 1]: no 299 squash, no [-1, 1] scaling."""
    from metrics.artfid import preprocess

    x = preprocess(Image.new("RGB", (300, 200), (255, 0, 51)))
    assert x.shape == (3, 512, 768)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))
    a = np.random.default_rng(0).integers(0, 256, (512, 512, 3)).astype(np.uint8)  # 512 px: kept as it is
    torch.testing.assert_close(preprocess(Image.fromarray(a)), torch.from_numpy(a).permute(2, 0, 1).float() / 255)


def test_art_inception_equals_the_art_fid_package(art_file):
    """Optional (runs where the ``art_fid`` package is installed): its Inception3 takes the file strictly (the same
    layout) and gives the same features on the same input, as its ``compute_fid`` calls it."""
    ai = pytest.importorskip("art_fid.inception")
    ref = ai.Inception3(num_classes1=7, num_classes2=5, init_weights=False)
    ref.load_state_dict(torch.load(art_file), strict=True)
    x = torch.rand(2, 3, 96, 112)
    with torch.no_grad():
        want = ref.eval()(x, return_features=True)
        torch.testing.assert_close(load_art_inception(art_file)(x), want)
    assert want.abs().mean() > 0.01


def test_lpips_loading_and_identity(tmp_path):
    model = load_lpips(*lpips_files(tmp_path))
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert model(x, x).abs().max() < 1e-6
        d = model(x, y)
    assert d.shape == (2,) and (d > 0).all()


def test_lpips_equals_the_lpips_package(tmp_path):
    """Optional (runs where the ``lpips`` package is installed): same AlexNet, its own v0.1 weights, same numbers."""
    lpips = pytest.importorskip("lpips")
    from pathlib import Path

    torch.manual_seed(0)
    ref = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()  # random AlexNet, no download
    slices = [ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5]
    torch.save({f"features.{k}": v for s in slices for k, v in s.state_dict().items()}, tmp_path / "alexnet.pth")
    ours = load_lpips(tmp_path / "alexnet.pth", Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth")
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x, y), ref(x, y).flatten(), rtol=1e-5, atol=1e-6)


def test_fid_inception_equals_pytorch_fid(monkeypatch):
    """Optional (runs where ``pytorch-fid`` is installed): its FID network, built without downloading, on our keys."""
    pfi = pytest.importorskip("pytorch_fid.inception")
    theirs = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    A, C = pfi.FIDInceptionA, pfi.FIDInceptionC
    theirs.Mixed_5b, theirs.Mixed_5c, theirs.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
    theirs.Mixed_6b, theirs.Mixed_6c, theirs.Mixed_6d, theirs.Mixed_6e = C(768, 128), C(768, 160), C(768, 160), C(768, 192)
    theirs.Mixed_7b, theirs.Mixed_7c = pfi.FIDInceptionE_1(1280), pfi.FIDInceptionE_2(2048)
    torch.manual_seed(0)
    for m in theirs.modules():  # weights that keep activations O(1), so that the comparison means something
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, 0, (2 / m.weight[0].numel()) ** 0.5)
    ours = FIDInception()
    ours.load_state_dict(theirs.state_dict())
    monkeypatch.setattr(pfi, "fid_inception_v3", lambda: theirs)  # instead of its download of the weights
    wrapper = pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
    x = torch.rand(2, 3, 120, 100)
    with torch.no_grad():
        want = wrapper.eval()(x)[0].flatten(1)
        torch.testing.assert_close(ours.eval()(x), want)
    assert want.abs().mean() > 0.01


def test_open_clip_and_timm_load_by_name(tmp_path):
    from omegaconf import OmegaConf

    name, clip_file = open_clip_model(tmp_path)
    embed = features_module.clip_embedder(OmegaConf.create({"name": name}), clip_file, torch.device("cpu"))
    e = embed(Image.new("RGB", (70, 50), (200, 10, 10)))
    assert e.shape == (32,) and np.linalg.norm(e) == pytest.approx(1, rel=1e-5)
    dino = features_module.dino_embedder(OmegaConf.create({"name": "vit_tiny_patch16_224"}),
                                         timm_vit(tmp_path / "model.safetensors"), torch.device("cpu"))
    assert dino(Image.new("RGB", (300, 260))).shape == (192,)


# ---------------------------------------------------------------------------------------------------------------------
# A whole evaluation


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return eval_models(tmp_path_factory.mktemp("eval_models"))


def image(path, seed: int, dark: bool = False):
    a = np.random.default_rng(seed).integers(60, 200, (64, 64, 3)).astype(np.uint8)
    Image.fromarray(a * 0 if dark else a).save(path)
    return str(path)


def make_run(folder):
    folder.mkdir()
    inputs = folder.parent / f"{folder.name}_inputs"
    inputs.mkdir()
    contents = [image(inputs / "c0.png", 0), image(inputs / "c1.png", 1)]
    styles = [image(inputs / "s0.png", 2), image(inputs / "s1.png", 3)]
    settings = [{"label": f"ffa.beta={b}", "overrides": {"ffa.beta": b, "ffa.alpha": 1 - b}} for b in (0.2, 0.4)]
    settings.append({"label": "ffa.recipe=plain", "overrides": {"ffa.recipe": "plain"}})
    jobs = []
    for s in range(3):
        for c, content in enumerate(contents):
            for t, style in enumerate(styles):
                output = f"s{s}_c{c}_s{t}.png"
                image(folder / output, 10 * s + 2 * c + t, dark=(s == 2 and c == 0))  # no face in these outputs
                jobs.append({"content": content, "style": style, "setting": s, "label": settings[s]["label"],
                             "overrides": settings[s]["overrides"], "output": output, "status": "done",
                             "error": None, "seconds": 1.0})
    jobs[1]["status"] = "skipped"  # a resumed run's output, made earlier with the same configuration: it counts
    jobs.append({**jobs[0], "output": "failed.png", "status": "failed", "error": "boom"})
    (folder / "index.json").write_text(json.dumps({"format": "magicstyle-run/1", "run": folder.name,
                                                   "settings": settings, "jobs": jobs}))
    return folder


def test_evaluate_writes_table_csv_and_plot(tmp_path, models, monkeypatch):
    import metrics.evaluation

    # scipy's sqrtm of a 2048 x 2048 matrix takes many seconds: here FID sees the first 16 features (the closed
    # forms above test the arithmetic; this test, which features go into which FID)
    monkeypatch.setattr(metrics.evaluation, "fid_between", lambda a, b: fid_between(a[:, :16], b[:, :16]))
    run = make_run(tmp_path / "run")
    paths = run_evaluation(run, dotlist=models)
    assert set(paths) == {"markdown", "csv", "plot"}
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["setting"] for r in rows] == ["ffa.beta=0.2", "ffa.beta=0.4", "ffa.recipe=plain"]
    assert [r["n"] for r in rows] == ["4", "4", "4"] and rows[0]["not_done"] == "1"
    for r in rows:
        for column in ("clip_content", "clip_style", "dino_content", "fid_style", "fid_content", "lpips"):
            assert np.isfinite(float(r[column])), column
        assert r["fid_art"] == r["artfid"] == ""  # no ArtFID weights: never FID's network under ArtFID's name
    assert rows[0]["faces_missing"] == "0" and rows[2]["faces_missing"] == "2"  # dark outputs: never scored
    assert -1 <= float(rows[2]["facesim"]) <= 1
    table = paths["markdown"].read_text()
    assert "| ffa.recipe=plain |" in table and "CLIP-I style" in table and "N = 4" in table
    assert "FID (ArtFID) and ArtFID are empty: they need ArtFID's Inception weights" in table
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second evaluation of a grown run embeds only the new image, and replaces the tables only with overwrite.
    with pytest.raises(Exception, match="exists"):
        run_evaluation(run, dotlist=models)
    index = json.loads((run / "index.json").read_text())
    index["jobs"][-1].update(status="done", output="grown.png")
    image(run / "grown.png", 99)
    (run / "index.json").write_text(json.dumps(index))
    embedded = []
    real = features_module.embedder
    monkeypatch.setattr(features_module, "embedder", lambda kind, cfg, files, device: (
        lambda img: (embedded.append(kind), real(kind, cfg, files, device)(img))[1]))
    run_evaluation(run, dotlist=models, overwrite=True)
    assert sorted(embedded) == ["clip", "dino", "face", "inception"]
    rows = list(csv.DictReader(paths["csv"].open()))
    assert rows[0]["n"] == "5" and rows[0]["not_done"] == "0"


def test_artfid_runs_artfids_own_inception(tmp_path, models, art_file, monkeypatch):
    """FID (ArtFID) and ArtFID come from ArtFID's network and pre-processing (its file in its own layout, which FID's
    loader refuses), cached apart from FID's features, against StyleID's style set: one style image per output."""
    import metrics.artfid
    import metrics.evaluation
    from metrics.artfid import preprocess

    monkeypatch.setattr(metrics.evaluation, "fid_between", lambda a, b: fid_between(a[:, :16], b[:, :16]))
    monkeypatch.setattr(metrics.artfid, "SHORTER_SIDE", 75)  # 512 in use; the smallest Inception input keeps it fast
    run = make_run(tmp_path / "run")
    index = json.loads((run / "index.json").read_text())
    jobs = [j for j in index["jobs"] if j["setting"] == 2 and j["status"] != "failed"]
    jobs[3]["style"] = jobs[2]["style"]  # setting 2's styles: s0, s1, s0, s0 (each style once: s0, s1)
    Image.new("RGB", (64, 64), (230, 30, 30)).save(jobs[1]["style"])  # s1 unlike the noise images
    (run / "index.json").write_text(json.dumps(index))
    given = [f"models.artfid_inception.file={art_file}", "models.artfid_inception.sha256=null"]
    paths = run_evaluation(run, dotlist=models + ["metrics=[styleid]"] + given)
    assert sorted(p.name for p in (run / "eval" / "cache").iterdir() if p.name.startswith("artfid")) == \
        ["artfid-s75-art_inception.npz"]
    rows = list(csv.DictReader(paths["csv"].open()))
    model = load_art_inception(art_file)
    with torch.no_grad():
        out = model(torch.stack([preprocess(Image.open(run / j["output"]).convert("RGB")) for j in jobs])).numpy()
        sty = model(torch.stack([preprocess(Image.open(j["style"]).convert("RGB")) for j in jobs])).numpy()
    repeated, unique = fid_between(out[:, :16], sty[:, :16]), fid_between(out[:, :16], sty[:2, :16])
    assert abs(repeated / unique - 1) > 0.05, (repeated, unique)
    assert float(rows[2]["fid_art"]) == pytest.approx(repeated, rel=1e-3)
    assert float(rows[2]["artfid"]) == pytest.approx((1 + float(rows[2]["lpips"])) * (1 + float(rows[2]["fid_art"])))


def test_table_prints_the_cosines_x100_as_the_paper():
    """Table I's form: CLIP-I, DINO and FaceSim x100 (89.2, not 0.892), said in the header; the CSV keeps fractions."""
    row = {"setting": "a", "n": 4, "clip_content": 0.892, "clip_style": 0.5, "dino_content": 0.969, "facesim": None,
           "fid_style": 73.1, "lpips": 0.25}
    columns = list(row)
    table = markdown([row], columns)
    assert "| CLIP-I content ×100 ↑ | CLIP-I style ×100 ↑ | DINO ×100 ↑ | FaceSim ×100 ↑ | FID style ↓ | LPIPS ↓ |" in table
    assert "| a | 4 | 89.20 | 50.00 | 96.90 | - | 73.10 | 0.2500 |" in table
    assert csv_text([row], columns).splitlines()[1] == "a,4,0.892,0.5,0.969,,73.1,0.25"


def test_sweep_lines_join_settings_that_differ_in_beta_only():
    settings = [{"overrides": {"ffa.beta": 0.4, "ffa.alpha": 0.6}}, {"overrides": {"ffa.recipe": "plain"}},
                {"overrides": {"ffa.beta": 0.2, "ffa.alpha": 0.8}}, {"overrides": {"ffa.beta": 0.2, "steps": 10}}]
    assert sweep_lines(settings) == [[2, 0]]


def test_evaluate_cli_errors(tmp_path, models, capsys):
    run = make_run(tmp_path / "run")
    before = sorted(p.name for p in run.iterdir())
    missing = [o for o in models if not o.startswith("models.dino.file=")] + [f"models.dino.file={tmp_path}/x.pth"]
    assert evaluate_cli.main([str(run), "--quiet", *missing]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dino model file" in err and "dl.fbaipublicfiles.com" in err
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written
    assert evaluate_cli.main([str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert evaluate_cli.main([str(run), "--metrics", "clip,colour", "--quiet"]) == 2
    assert "metrics must be" in capsys.readouterr().err
    (run / "index.json").write_text("{")
    assert evaluate_cli.main([str(run), "--quiet", *models]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_hub_reference_uses_the_local_copy_first(tmp_path, monkeypatch):
    """EVAL_LOCAL_DIR is relative, like weights/eval: found under the repository from any current folder."""
    import faces.weights

    monkeypatch.setattr(faces.weights, "ROOT", tmp_path / "repo")
    monkeypatch.setattr(faces.weights, "EVAL_LOCAL_DIR", "local/eval")
    (tmp_path / "repo" / "local" / "eval").mkdir(parents=True)
    (tmp_path / "repo" / "local" / "eval" / "open_clip_model.safetensors").write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setattr("models.hub.download", lambda *a, **k: pytest.fail("downloaded despite the local copy"))
    ref = "hf:timm/vit_large_patch14_clip_224.openai/open_clip_model.safetensors"
    assert faces.weights.require_file(ref, "clip") == tmp_path / "repo" / "local" / "eval" / "open_clip_model.safetensors"


def test_offline_hub_model_says_how_the_evaluation_fetches_it(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE (conftest) and neither a local copy nor a cached one: the hint is evaluate.py's own command, not
    the CLI's --download-only (which fetches the run's model files only)."""
    import faces.weights
    from models.hub import HubError

    monkeypatch.setattr(faces.weights, "ROOT", tmp_path)  # no weights/eval copy
    ref = "hf:timm/vit_large_patch14_clip_224.openai/open_clip_model.safetensors"
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set: run evaluate.py once with network access") as e:
        faces.weights.require_file(ref, "clip")
    assert "--download-only" not in str(e.value)


def test_an_unreadable_model_file_is_one_line(tmp_path, monkeypatch):
    """Reading the file to hash it fails (a permission error; simulated: the suite may run as root)."""
    import faces.weights

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(faces.weights, "file_sha256", refuse)
    model = tmp_path / "alexnet.pth"
    model.write_bytes(b"x")
    with pytest.raises(faces.weights.FaceModelError, match="cannot be read .Permission denied.; check its permissions"):
        faces.weights.require_file(model, "lpips_alexnet")


def test_out_of_memory_while_loading_is_not_blamed_on_the_file():
    import faces.weights

    with pytest.raises(torch.cuda.OutOfMemoryError):
        with faces.weights.loading("clip.safetensors", "clip"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")


def test_evaluate_on_cuda_without_a_gpu_is_one_line(tmp_path, models, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = make_run(tmp_path / "run")
    assert evaluate_cli.main([str(run), "--device", "cuda", "--quiet", *models]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU" in err


# ---------------------------------------------------------------------------------------------------------------------
# Damaged or wrong model files, through the command: one line naming the file and what to do, exit status 2


def damaged(kind: str, folder, models: list[str]):
    """A model file gone wrong: a download cut short, bytes that are no model, or another model's weights."""
    given = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in models}
    real = lambda key: open(given[f"models.{key}.file"], "rb").read()  # noqa: E731
    path = folder / f"damaged-{kind}"
    if kind in ("inception", "clip"):  # another model's file: a link, not a 100 MB copy per test
        path.symlink_to(given[f"models.{'fid_inception' if kind == 'inception' else kind}.file"])
        return path
    path.write_bytes({
        "truncated": lambda: real("fid_inception")[:4096], "garbage": lambda: b"<html>Not Found</html>" * 10,
        "empty": lambda: b"",
        "tensor": lambda: (torch.save(torch.zeros(3), folder / "t.pth"), (folder / "t.pth").read_bytes())[1],
    }[kind]())
    return path


@pytest.mark.parametrize("entry, metric, kind", [
    ("fid_inception", "fid", "truncated"), ("fid_inception", "fid", "garbage"), ("fid_inception", "fid", "empty"),
    ("fid_inception", "fid", "tensor"), ("lpips_alexnet", "styleid", "truncated"),
    ("lpips_linear", "styleid", "tensor"),
    ("lpips_linear", "styleid", "inception"), ("scrfd", "face", "garbage"), ("arcface", "face", "empty"),
    ("clip", "clip", "truncated"), ("clip", "clip", "inception"), ("dino", "dino", "garbage"),
    ("dino", "dino", "clip"), ("dino", "dino", "inception"),
])
def test_evaluate_cli_damaged_or_wrong_model_file(tmp_path, models, capsys, entry, metric, kind):
    run = make_run(tmp_path / "run")
    path = damaged(kind, tmp_path, models)
    overrides = [o for o in models if not o.startswith(f"models.{entry}.file=")] + [f"models.{entry}.file={path}"]
    assert evaluate_cli.main([str(run), "--quiet", "--metrics", metric, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(path) in err, err
    assert f"models.{entry}.file" in err and "configs/eval.yaml" in err, err
    assert not (run / "eval" / "metrics.md").exists()


def _set(container_key: str, i, key, value):
    def edit(index):
        if key is None:
            index[container_key][i] = value
        elif value is KeyError:
            del index[container_key][i][key]
        else:
            index[container_key][i][key] = value
    return edit


@pytest.mark.parametrize("edit, problem", [
    (lambda index: index.update(jobs={"0": {}}), "no jobs list"),
    (_set("jobs", 0, None, "s0_c0_s0.png"), "job 0 is not an object"),
    (_set("jobs", 2, "output", KeyError), "job 2 lacks 'output'"),
    (_set("jobs", 0, "output", 5), "job 0: output must be a file name"),
    (_set("jobs", 0, "output", ""), "job 0: output must be a file name"),
    (_set("jobs", 0, "content", None), "job 0: content must be a file name"),
    (_set("jobs", 0, "status", ["done"]), "job 0: status must be"),
    (_set("jobs", 0, "setting", "0"), "job 0: setting must be an index into settings"),
    (_set("jobs", 0, "setting", True), "job 0: setting must be an index into settings"),
    (_set("jobs", 0, "setting", 7), "job 0: setting must be an index into settings"),
    (_set("settings", 1, None, "ffa.beta=0.4"), "setting 1 is not an object"),
    (_set("settings", 1, "overrides", "ffa.beta=0.4"), "setting 1: overrides must be an object"),
    (_set("settings", 1, "label", 0.4), "setting 1: label must be a string"),
])
def test_evaluate_cli_damaged_index(tmp_path, models, capsys, edit, problem):
    """A hand-edited or damaged index.json: one line naming it and the problem, exit status 2, nothing written."""
    run = make_run(tmp_path / "run")
    index = json.loads((run / "index.json").read_text())
    edit(index)
    (run / "index.json").write_text(json.dumps(index))
    assert evaluate_cli.main([str(run), "--quiet", "--metrics", "clip", *models]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(run / "index.json") in err, err
    assert problem in err, err
    assert not (run / "eval").exists()


@pytest.mark.parametrize("cache", [b"", b"PK\x03\x04 cut short", b"not a zip at all"])
def test_evaluate_rebuilds_a_damaged_feature_cache(tmp_path, models, capsys, cache):
    """RUN_DIR/eval/cache/*.npz is a convenience: an empty, truncated or foreign file there is embedded again."""
    from metrics import load_eval_config

    run = make_run(tmp_path / "run")
    cfg = load_eval_config(dotlist=models)
    path = run / "eval" / "cache" / features_module.cache_name("clip", cfg, features_module.model_files("clip", cfg))
    path.parent.mkdir(parents=True)
    path.write_bytes(cache)
    assert evaluate_cli.main([str(run), "--quiet", "--metrics", "clip", *models]) == 0, capsys.readouterr().err
    with np.load(path) as data:
        assert len(data["keys"]) == len(data["values"]) == 11  # distinct images (make_run repeats some pixels)


def test_evaluate_cli_unreadable_or_damaged_image(tmp_path, models, capsys, monkeypatch):
    import metrics.evaluation

    run = make_run(tmp_path / "run")
    real = metrics.evaluation.hash_file

    def hash_file(path):
        if path.name == "s1_c0_s0.png":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(metrics.evaluation, "hash_file", hash_file)  # (chmod cannot stop root, who runs CI)
    assert evaluate_cli.main([str(run), "--quiet", "--metrics", "clip", *models]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(run / "s1_c0_s0.png") in err and "Permission denied" in err, err
    monkeypatch.undo()
    (run / "s1_c0_s0.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    assert evaluate_cli.main([str(run), "--quiet", "--metrics", "clip", *models]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(run / "s1_c0_s0.png") in err, err
    assert not (run / "eval" / "metrics.md").exists()


def test_evaluate_cli_run_without_outputs(tmp_path, models, capsys):
    """Nothing to score (every job failed, or no output file is there): one line, not a table of dashes."""
    run = make_run(tmp_path / "run")
    for output in run.glob("s*.png"):
        output.unlink()
    assert evaluate_cli.main([str(run), "--quiet", *models]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(run / "index.json") in err and "none of its 13 jobs" in err, err
    assert not (run / "eval").exists()


@pytest.mark.parametrize("override, metric, words", [
    ("models.fid_inception.file=5", "fid", ["models.fid_inception.file", "not a file path"]),
    ("models.scrfd.file=[a,b]", "face", ["models.scrfd.file", "not a file path"]),
    ("models.clip.name=ViT-Q-99", "clip", ["models.clip.name 'ViT-Q-99'", "open_clip knows"]),
    ("models.dino.name=5", "dino", ["models.dino.name 5", "timm knows"]),
    ("models.dino.name=vit_nope_patch16", "dino", ["models.dino.name 'vit_nope_patch16'", "timm knows"]),
])
def test_evaluate_cli_bad_model_setting(tmp_path, models, capsys, override, metric, words):
    """A model entry's file that is no path, or a name the library does not know: one line, before any work."""
    run = make_run(tmp_path / "run")
    key = override.split("=")[0]
    assert evaluate_cli.main([str(run), "--quiet", "--metrics", metric,
                              *[o for o in models if not o.startswith(key + "=")], override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and all(w in err for w in words), err


@pytest.mark.parametrize("yaml, dotlist", [
    ("models: [1, 2]\n", []), ("models: 5\n", []), ("models:\n  clip: 5\n", []), (None, ["models.dino=5"]),
    (None, ["models=5"]),
])
def test_evaluate_cli_models_that_are_no_mapping(tmp_path, capsys, yaml, dotlist):
    """configs/eval.yaml's ``models`` and its entries are mappings; a user's YAML or override that replaces one with
    a list or a number is one line (the configuration is checked before anything is read)."""
    run = make_run(tmp_path / "run")
    config = []
    if yaml:
        (tmp_path / "eval.yaml").write_text(yaml)
        config = ["--config", str(tmp_path / "eval.yaml")]
    assert evaluate_cli.main([str(run), "--quiet", *config, *dotlist]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "must be a mapping" in err, err


def test_evaluate_cli_betas_of_other_types(tmp_path, models, capsys):
    """A hand-edited index whose ffa.beta values are not all numbers: those settings are no point of a beta sweep
    line in the plot (sorting them with the numbers was a TypeError)."""
    run = make_run(tmp_path / "run")
    index = json.loads((run / "index.json").read_text())
    index["settings"][1]["overrides"]["ffa.beta"] = "0.4"
    (run / "index.json").write_text(json.dumps(index))
    assert evaluate_cli.main([str(run), "--quiet", "--metrics", "clip", *models]) == 0, capsys.readouterr().err
    assert (run / "eval" / "scatter.png").is_file()
    settings = [{"overrides": {"ffa.beta": b}} for b in (0.4, "0.3", None, 0.2, True)]
    assert sweep_lines(settings) == [[3, 0]]


def test_evaluate_cli_face_axis_needs_the_face_metric(tmp_path, capsys):
    """--content-axis face plots FaceSim: without the face metric there would be no plot, silently."""
    run = make_run(tmp_path / "run")
    assert evaluate_cli.main([str(run), "--quiet", "--metrics", "clip", "--content-axis", "face"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "add face to --metrics" in err, err
    assert not (run / "eval").exists()


def stand_in_scores(monkeypatch, n: int) -> None:
    """metrics.evaluation.evaluate without models: every setting of the run scored alike, on n outputs each."""
    import metrics.evaluation

    def evaluate(run_dir, cfg, progress):
        index = metrics.evaluation.read_index(run_dir)
        rows = [{**dict.fromkeys(metrics.evaluation.COLUMNS), "setting": s["label"], "n": n, "not_done": 0,
                 "clip_content": 0.5 + i / 10, "clip_style": 0.5, "dino_content": 0.5}
                for i, s in enumerate(index["settings"])]
        return rows, index

    monkeypatch.setattr(metrics.evaluation, "evaluate", evaluate)


def test_fid_note_warns_below_2048_images(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    stand_in_scores(monkeypatch, n=4)
    table = run_evaluation(run, dotlist=["metrics=[fid]"])["markdown"].read_text()
    assert "N = 4 outputs per setting" in table and "biased upward" in table and "at the same N" in table
    stand_in_scores(monkeypatch, n=2048)
    table = run_evaluation(run, dotlist=["metrics=[fid]"], overwrite=True)["markdown"].read_text()
    assert "N = 2048 outputs per setting" in table and "biased" not in table and "at the same N" in table


def test_a_run_without_a_sweep_has_a_setting_name(tmp_path, monkeypatch):
    """A run with no sweep: its one setting's label is "" (index.json); the table names it as the grid does."""
    from magicstyle.grid import RUN_CONFIG_LABEL
    from metrics.evaluation import evaluate, load_eval_config

    run = make_run(tmp_path / "run")
    index = json.loads((run / "index.json").read_text())
    index["settings"] = [{"label": "", "overrides": {}}]
    index["jobs"] = [{**j, "setting": 0, "label": ""} for j in index["jobs"] if j["setting"] == 0]
    (run / "index.json").write_text(json.dumps(index))
    monkeypatch.setattr(features_module, "model_files", lambda kind, cfg: None)
    monkeypatch.setattr(features_module, "compute", lambda kind, files, model, cfg, device, cache, progress:
                        {d: np.ones(4) / 2 for d in files})
    rows, _ = evaluate(run, load_eval_config(dotlist=["metrics=[clip]"]))
    assert [r["setting"] for r in rows] == [RUN_CONFIG_LABEL] and RUN_CONFIG_LABEL == "(run config)"


def test_overwrite_removes_the_plot_a_new_evaluation_does_not_make(tmp_path, monkeypatch):
    """--overwrite with metrics that make no plot (no CLIP-I): the earlier scatter.png does not stay beside the new
    tables."""

    run = make_run(tmp_path / "run")
    stand_in_scores(monkeypatch, n=4)
    assert set(run_evaluation(run, dotlist=["metrics=[clip]"])) == {"markdown", "csv", "plot"}
    paths = run_evaluation(run, dotlist=["metrics=[dino]"], overwrite=True)
    assert set(paths) == {"markdown", "csv"} and "DINO" in paths["markdown"].read_text()
    assert not (run / "eval" / "scatter.png").exists()


def test_evaluate_cli_given_the_index_file(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert evaluate_cli.main([str(run / "index.json"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err and "run folder" in err, err


@pytest.mark.parametrize("missing, one_line", [("scipy", True), ("scipy.linalg", True), ("magicstyle.typo", False)])
def test_a_missing_eval_package_is_one_line_and_a_broken_import_is_not_hidden(missing, one_line, tmp_path,
                                                                               monkeypatch, capsys):
    import builtins
    import sys

    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "metrics":
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return real(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "metrics", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake)
    if one_line:
        assert evaluate_cli.main([str(tmp_path), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "needs the [eval] extra" in err
    else:
        with pytest.raises(ModuleNotFoundError, match="magicstyle.typo"):
            evaluate_cli.main([str(tmp_path), "--quiet"])
