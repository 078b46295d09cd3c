"""kv-frontier-v1 (``mlakit frontier``): bytes as stored against the formats' arithmetic, the
figures against decoding through a real quantised cache, the comparison rule on hand-made
points, and the command on tiny checkpoints."""

import json
import math

import pytest
import torch

from mlakit import ModelConfig, Transformer
from mlakit import frontier as fr
from mlakit.errors import MlakitError
from mlakit.loading import LoadedModel
from mlakit.testing.models import WordTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = dict(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, intermediate_size=96,
             max_seq_len=512)
MLA = dict(attention="mla", kv_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)


def tiny(attention: str) -> Transformer:
    shape = {**SHAPE, **(MLA if attention == "mla" else {})}
    return Transformer(ModelConfig(**shape)).init_random(seed=0, std=0.2)


def stored_bytes(channels: int, cache: str) -> int:
    """Bytes of one vector as the formats define them: 16-bit values, or 8/4-bit values plus a
    float32 scale per group of 64 (int4: 32) channels."""
    bits = {"bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int4": 4}[cache]
    group = {"fp8": 64, "int8": 64, "int4": 32}.get(cache)
    return channels * bits // 8 + (4 * math.ceil(channels / group) if group else 0)


@pytest.mark.parametrize("cache", ["bf16", "fp16", "fp8", "int8", "int4"])
def test_bytes_per_token_layer_count_values_and_scales(cache):
    gqa, mla = tiny("gqa"), tiny("mla")
    assert fr.cache_bytes_per_token_layer(gqa, cache) == 2 * 2 * stored_bytes(32, cache)  # K and V, 2 heads
    assert fr.cache_bytes_per_token_layer(mla, cache) == stored_bytes(48, cache) + 16 * 2  # latent + bf16 RoPE key
    if cache in ("fp8", "int8", "int4"):
        assert fr.cache_bytes_per_token_layer(mla, cache + "+rope") == stored_bytes(48, cache) + stored_bytes(16, cache)


def decoded_ppl(model, windows: torch.Tensor, cache: str) -> float:
    """The reference: each window decoded one token at a time through a real cache in ``cache``
    format (what generation reads), the NLL of every next token in float64."""
    from mlakit.options import ForwardOptions

    name, rope = cache.removesuffix("+rope"), cache.endswith("+rope")
    options, nll, n = ForwardOptions(kv_cache_dtype=name, quantize_rope=rope), 0.0, 0
    with torch.no_grad():
        for w in windows:
            kv = model.new_cache(1, w.numel(), kv_cache_dtype=name, quantize_rope=rope)
            for t in range(w.numel() - 1):
                logits = model(w[None, t:t + 1], torch.tensor([[t]]), kv, options)[0, -1].double()
                nll -= float(logits.log_softmax(-1)[w[t + 1]])
                n += 1
    return math.exp(nll / n)


def windows(seed: int = 0) -> fr.Windows:
    g = torch.Generator().manual_seed(seed)
    return fr.Windows(short=torch.randint(0, 101, (3, 24), generator=g),
                      long=torch.randint(0, 101, (1, 48), generator=g), passkey_length=160, passkey_trials=2)


def test_points_cover_every_model_and_format_with_figures_read_through_the_cache():
    models = {"orig": tiny("gqa"), "mla-a": tiny("mla")}
    tokenizer = WordTokenizer()
    load = lambda ref: LoadedModel(model=models[ref], tokenizer=tokenizer, source=ref)  # noqa: E731
    w = windows()
    result = fr.run_frontier(load, "orig", ["mla-a"], ["bf16", "int4"], ["bf16", "int8", "int4+rope"], windows=w,
                             progress=False)
    assert [(p.model, p.kind, p.cache) for p in result.points] == [
        ("orig", "original", "bf16"), ("orig", "original", "int4"), ("mla-a", "mla", "bf16"), ("mla-a", "mla", "int8"),
        ("mla-a", "mla", "int4+rope")]
    base = 2 * 2 * 32 * 2
    assert result.original_bytes_per_token_layer == base
    for p in result.points:
        assert p.fewer_bytes == pytest.approx(1 - p.bytes_per_token_layer / base)
        assert p.passkey_4096 is not None and 0 <= p.passkey_4096 <= 1
    by = {(p.model, p.cache): p for p in result.points}
    for (ref, cache) in [("orig", "int4"), ("mla-a", "int8"), ("mla-a", "int4+rope")]:
        point = by[(ref, cache)]
        assert point.ppl_512 == pytest.approx(decoded_ppl(models[ref], w.short, cache), rel=1e-4)
        assert point.ppl_long == pytest.approx(decoded_ppl(models[ref], w.long, cache), rel=1e-4)
    assert by[("orig", "int4")].ppl_512 != by[("orig", "bf16")].ppl_512  # 4-bit values did change the logits
    assert result.to_dict()["windows"] == {"short": [3, 24], "long": [1, 48], "passkey_length": 160,
                                           "passkey_trials": 2}


def test_the_original_must_not_be_mla_and_checkpoints_must_be():
    models = {"gqa": tiny("gqa"), "gqa-2": tiny("gqa"), "mla": tiny("mla")}
    load = lambda ref: LoadedModel(model=models[ref], tokenizer=WordTokenizer(), source=ref)  # noqa: E731
    w = windows()
    w.passkey_trials = 0
    with pytest.raises(MlakitError, match="not an MLA checkpoint"):
        fr.run_frontier(load, "gqa", ["gqa-2"], ["bf16"], ["bf16"], windows=w, progress=False)
    with pytest.raises(MlakitError, match="already MLA"):
        fr.run_frontier(load, "mla", [], ["bf16"], windows=w, progress=False)


def point(kind, cache, nbytes, ppl, long, passkey, model=None):
    return fr.FrontierPoint(model=model or ("orig" if kind == "original" else "/ckpt/mla50"), kind=kind, cache=cache,
                            bytes_per_token_layer=nbytes, fewer_bytes=1 - nbytes / 768, ppl_512=ppl, ppl_long=long,
                            passkey_4096=passkey, seconds=0.0)


def test_comparison_takes_the_best_mla_point_against_the_original_at_the_same_or_more_bytes():
    points = [point("original", "bf16", 768, 29.6, 20.5, 1.0), point("original", "int8", 408, 29.7, 20.6, 1.0),
              point("original", "int4", 240, 30.8, 21.4, 0.9),
              point("mla", "bf16", 384, 31.0, 22.0, 0.8), point("mla", "int8", 204, 31.1, 22.1, 0.9),
              point("mla", "int4", 120, 33.0, 25.0, 0.5), point("mla", "int8", 180, 30.5, 23.0, 0.9, model="/c/mla75")]
    rows = fr.comparisons(points)
    assert [r["saving"] for r in rows] == [0.5, 0.75, 0.875]
    # 50%: every MLA point qualifies; the best ppl is mla75 int8 (180 B) against int4 (240 B)
    assert rows[0]["mla"] == "mla75 int8" and rows[0]["original"] == "original int4"
    assert rows[0]["no_worse"] == {"ppl_512": True, "ppl_long": False, "passkey_4096": True}
    # 75% (<= 192 B): mla75 int8 again; 87.5% (<= 96 B): no MLA point
    assert rows[1]["mla"] == "mla75 int8"
    assert rows[2] == {"saving": 0.875, "mla": None, "original": None, "no_worse": None}


def test_report_files_and_table(tmp_path):
    points = [point("original", "bf16", 768, 29.6, 20.5, 1.0), point("original", "int4", 240, 30.8, 21.4, None),
              point("mla", "int8", 204, 31.1, 22.1, None)]
    result = fr.Frontier(protocol=fr.PROTOCOL, points=points, original_bytes_per_token_layer=768,
                         windows={"passkey_length": 4096})
    paths = fr.write_report(result, tmp_path / "out")
    assert [p.name for p in paths] == ["frontier.md", "frontier.png", "frontier.json"]
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(paths[2].read_text())
    assert saved["protocol"] == "kv-frontier-v1" and len(saved["points"]) == 3
    table = paths[0].read_text()
    assert "kv-frontier-v1" in table and "| original | int4 | 240 | 68.8% | 30.80 | 21.40 |  |" in table


def test_command_checks_its_arguments_before_loading(capsys, tmp_path):
    from mlakit.cli import main

    assert main(["frontier", "default", "--cache-dtypes", "int8,int3"]) == 2
    assert "--cache-dtypes takes comma-separated formats" in capsys.readouterr().err
    assert main(["frontier", "default", "--latent-dtypes", "bf16+rope"]) == 2
    assert "--latent-dtypes takes" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")  # looks like a model until it is loaded
    assert main(["frontier", str(tmp_path), "--mla", "/no/such/ckpt"]) == 2
    assert "/no/such/ckpt does not exist" in capsys.readouterr().err


def test_command_on_tiny_checkpoints(tmp_path, capsys):
    pytest.importorskip("transformers")
    from mlakit import evaluate as ev
    from mlakit.cli import main
    from mlakit.testing.models import save_tiny_with_tokenizer

    try:
        ev.data_path()
    except MlakitError:
        pytest.skip("the protocol text is not here")
    _, original = save_tiny_with_tokenizer(tmp_path, "llama", 2, max_position_embeddings=4096)
    converted = tmp_path / "mla"
    assert main(["convert", str(original), "-o", str(converted), "--kv-lora-rank", "12", "--rope-dim", "4",
                 "--calib-tokens", "1024", "--json"]) == 0
    capsys.readouterr()
    assert main(["frontier", str(original), "--mla", str(converted), "--cache-dtypes", "bf16,int8",
                 "--latent-dtypes", "int8", "--no-passkey", "--device", "cpu", "--json",
                 "--plot-dir", str(tmp_path / "plot")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(p["kind"], p["cache"]) for p in out["points"]] == [("original", "bf16"), ("original", "int8"),
                                                               ("mla", "int8")]
    assert all(math.isfinite(p["ppl_512"]) and math.isfinite(p["ppl_long"]) and p["passkey_4096"] is None
               for p in out["points"])
    assert out["windows"]["short"] == [40, 512] and out["windows"]["long"] == [5, 4096]
    assert (tmp_path / "plot" / "frontier.png").exists()
