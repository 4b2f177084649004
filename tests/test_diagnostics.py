"""Attention diagnostics of FFF: the share of the generated queries' attention on style tokens per layer and step."""
from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

import magicstyle.diagnostics as diagnostics_module
from magicstyle import ConfigError, csdi, fff
from magicstyle.diagnostics import AttentionDiagnostics, region_queries, style_share, write_diagnostics
from magicstyle.output import OutputError
from magicstyle.pipeline import encode_images, load_image
from test_batch import IMAGES, config, sd  # noqa: F401  (sd is a fixture)

STEPS, LAYERS = 3, 6  # the tiny configuration: 3 steps, ffa.layers = output_blocks.6 to .11


@pytest.fixture(scope="module")
def z0(sd):  # noqa: F811
    return encode_images(sd, torch.cat([load_image(path, 64) for path in IMAGES[:3]]))


def test_style_share_is_the_softmax_mass_on_the_style_keys():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, 8, generator=g, dtype=torch.float64), torch.randn(1, 7, 8, generator=g, dtype=torch.float64)
    got = style_share(q, k, style_keys=3, heads=2, queries=torch.tensor([0, 2, 3]))
    for b in range(2):
        shares = []
        for h in range(2):
            cols = slice(4 * h, 4 * h + 4)
            for n in (0, 2, 3):
                p = torch.softmax(torch.stack([q[b, n, cols] @ k[0, m, cols] / 2.0 for m in range(7)]), 0)
                shares.append(p[-3:].sum())
        assert math.isclose(got[b].item(), torch.stack(shares).mean().item(), rel_tol=1e-9)
    assert torch.equal(style_share(q, k, 7, 2), torch.ones(2, dtype=torch.float64))
    assert torch.equal(style_share(q, k, 0, 2), torch.zeros(2, dtype=torch.float64))


def test_region_queries():
    # 64 px output, a 4x4 token grid (16 px cells): the box (16, 0, 48, 16) covers cells (0, 1) and (0, 2)
    assert region_queries((16, 0, 48, 16), 64, 16).tolist() == [1, 2]
    assert region_queries((0, 0, 64, 64), 64, 16).tolist() == list(range(16))
    assert region_queries((20, 20, 22, 22), 64, 16).tolist() == [5]  # smaller than a cell: the cell holding it


def test_diagnostics_do_not_change_the_image_and_give_one_share_per_layer_and_step(sd, z0):  # noqa: F811
    cfg = config()
    inversion = csdi(sd, z0, cfg)
    pairs = [(0, 1), (0, 2)]
    diagnostics = AttentionDiagnostics.from_config(cfg)
    with_diagnostics = fff(sd, inversion, cfg, pairs, diagnostics=diagnostics)
    assert torch.equal(with_diagnostics, fff(sd, inversion, cfg, pairs))
    tables = [diagnostics.table(i) for i in range(2)]
    for table in tables:
        assert len(table) == LAYERS and all(len(row) == STEPS for row in table)
        assert all(0.0 <= v <= 1.0 for row in table for v in row)
    assert tables[0] != tables[1]  # each pair its own style
    # a region: only its queries; the whole image as a region is no region
    box = AttentionDiagnostics.from_config(config(diagnostics={"region": "0,0,32,32"}))
    fff(sd, inversion, cfg, pairs, diagnostics=box)
    assert box.table(0) != tables[0]
    whole = AttentionDiagnostics((0, 0, 64, 64))
    fff(sd, inversion, cfg, pairs, diagnostics=whole)
    assert whole.table(1) == tables[1]


@pytest.mark.parametrize("recipe, expect", [("vsp", 1.0), ("styleid", 1.0), ("plain", None)])
def test_recipes_that_attend_to_style_only_or_not_at_all(sd, z0, recipe, expect):  # noqa: F811
    cfg = config(ffa={"recipe": recipe})
    diagnostics = AttentionDiagnostics()
    fff(sd, csdi(sd, z0, cfg), cfg, diagnostics=diagnostics)
    assert all(v == expect for row in diagnostics.table() for v in row)


def test_steps_without_the_recipe_are_null(sd, z0):  # noqa: F811
    cfg = config(ffa={"timesteps": [1]})
    diagnostics = AttentionDiagnostics()
    fff(sd, csdi(sd, z0, cfg), cfg, diagnostics=diagnostics)
    assert all(row[0] is None and row[1] is not None and row[2] is None for row in diagnostics.table())


def test_off_costs_nothing(sd, z0, monkeypatch):  # noqa: F811
    monkeypatch.setattr(diagnostics_module, "style_share", lambda *a, **k: pytest.fail("diagnostics ran"))
    cfg = config()
    fff(sd, csdi(sd, z0, cfg), cfg)


def test_write_diagnostics(sd, z0, tmp_path):  # noqa: F811
    cfg = config()
    diagnostics = AttentionDiagnostics()
    fff(sd, csdi(sd, z0, cfg), cfg, [(0, 1), (2, 1)], diagnostics=diagnostics)
    json_path, png_path = write_diagnostics(diagnostics, tmp_path / "a_b.png", pair_index=1)
    assert (json_path.name, png_path.name) == ("a_b.attention.json", "a_b.attention.png")
    record = json.loads(json_path.read_text())
    assert record["pair"] == [2, 1] and record["recipe"] == "ffa" and record["region"] is None
    assert record["style_share"] == diagnostics.table(1) and len(record["layers"]) == LAYERS
    with Image.open(png_path) as image:
        assert image.format == "PNG" and image.width > 300
    with pytest.raises(OutputError, match="exists"):
        write_diagnostics(diagnostics, tmp_path / "a_b")
    write_diagnostics(diagnostics, tmp_path / "a_b", overwrite=True)


def test_bad_regions_are_config_errors():
    for bad in ("0,0,64", "10,0,5,20", "0,0,65,64", "a,b,c,d"):
        with pytest.raises(ConfigError, match="diagnostics.region"):
            config(diagnostics={"region": bad})
