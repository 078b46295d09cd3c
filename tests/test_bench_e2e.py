"""decode-e2e-v1 bench (`mlakit bench e2e`): the whole pipeline on the CPU with a tiny
shape, out-of-memory rows, and the largest-batch search on a fake memory model."""

import json

import pytest
import torch

from mlakit.bench import e2e, hf_baseline, memory, report, timing, variants
from mlakit.config import preset

pytest.importorskip("matplotlib")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_options(**overrides) -> e2e.E2EOptions:
    opts = dict(preset="tiny", device="cpu", dtype="float32", grid=((1, 32), (2, 64)), steps=2, warmup=1,
                max_batch_context=64, max_batch_steps=1, prefill_tokens=32, prefill_reps=1, hf=False,
                memory_budget_gib=0.002, headroom_gib=0.0, progress=False)
    opts.update(overrides)
    return e2e.E2EOptions(**opts)


# ---------------------------------------------------------------- pure functions
def test_variants_of_llama3_8b():
    built = variants.make_variants(preset("llama3-8b"), 512, 64)
    assert [v.name for v in built] == ["GQA-8 (original)", "MLA 512+64", "MQA", "MHA"]
    mla = built[1].config
    assert (mla.kv_lora_rank, mla.qk_rope_head_dim, mla.qk_nope_head_dim, mla.v_head_dim, mla.q_lora_rank) == \
        (512, 64, 128, 128, None)
    assert mla.kv_values_per_token_total() == 32 * 576
    assert built[2].config.n_kv_heads == 1 and built[3].config.n_kv_heads == 32
    # an MHA original has no separate MHA sibling
    mha = preset("llama3-8b").replace(n_kv_heads=32)
    assert [v.key for v in variants.make_variants(mha, 512, 64)] == ["original", "mla", "mqa"]


def test_bytes_and_bandwidth_arithmetic():
    model = variants.build_random_model(variants.SHAPES["tiny"]["config"], torch.device("cpu"), torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    emb = model.tok_embeddings.weight
    assert variants.weight_bytes_per_step(model, 3) == 2 * (params - emb.numel() + 3 * emb.shape[1])
    assert all(bool((p != 0).any()) for p in model.parameters())  # random, never zeros
    # 16 GB at 3000 GB/s is 5.33 ms: a 6.67 ms step is at 80% of the limit
    assert timing.bandwidth_fraction(16e9, 3000.0, 16e9 / 3000e9 * 1e3 / 0.8) == pytest.approx(0.8)
    assert timing.bandwidth_fraction(16e9, None, 5.0) is None
    assert hf_baseline.hf_decode_rate(1.0, 3.0, batch=4, steps=20) == pytest.approx(40.0)
    assert hf_baseline.hf_decode_rate(2.0, 1.0, batch=4, steps=20) is None


def test_max_batch_search_on_fake_memory():
    # a device with 80 GiB free, 1.5 GiB kept back, 1.2 GiB per sequence: estimate 65
    per_seq = int(1.2 * memory.GIB)
    estimate = memory.estimate_max_batch(80 * memory.GIB, per_seq, int(1.5 * memory.GIB))
    assert estimate == 65
    # the real limit is lower (fragmentation, activations): the search shrinks to it
    calls = []

    def fits(batch):
        calls.append(batch)
        return batch * per_seq + 3 * memory.GIB <= 80 * memory.GIB

    best, tries = memory.search_max_batch(estimate, fits)
    assert best == 64 and tries == [(65, False), (64, True)]
    # large batches shrink by ~3% per try; nothing fits -> 0 after max_tries
    best, tries = memory.search_max_batch(1000, lambda b: b <= 900, max_tries=8)
    assert best == 900 or tries[-1][0] < 900
    assert best <= 900 and len(tries) <= 8
    assert memory.search_max_batch(0, lambda b: True) == (0, [])
    assert memory.search_max_batch(5, lambda b: False, max_tries=3) == (0, [(5, False), (4, False), (3, False)])


def test_hf_memory_estimate_flags_the_big_rows():
    config = preset("llama3-8b")
    weights = hf_baseline.hf_memory_estimate(config, 0, 0, 0, 2)
    assert 15.5e9 < weights < 16.5e9  # 8.03 B parameters in bf16
    assert hf_baseline.hf_memory_estimate(config, 64, 8192, 21, 2) > 80 * memory.GIB  # cannot fit an H100
    assert hf_baseline.hf_memory_estimate(config, 1, 8192, 21, 2) < 20 * memory.GIB


# ---------------------------------------------------------------- the whole pipeline (CPU)
def test_cpu_pipeline_table_json_plots(tmp_path):
    result = e2e.run_e2e(tiny_options(hf=True))
    rows = result["rows"]
    assert result["protocol"] == "decode-e2e-v1" and result["gpu"] == "CPU"
    names = ["GQA-2 (original)", "MLA 32+8", "MQA", "MHA"]
    for name in names:
        decode = [r for r in rows if r["variant"] == name and r["phase"] == "decode"]
        assert [(r["batch"], r["context"]) for r in decode] == [(1, 32), (2, 64)]
        for r in decode:
            assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["ms_per_step"] > 0
            assert r["tokens_per_s"] == pytest.approx(r["batch"] / (r["ms_per_step"] * 1e-3))
            assert r["bytes_per_step"] > 0 and r["bw_fraction"] > 0
        prefill = [r for r in rows if r["variant"] == name and r["phase"] == "prefill"]
        assert len(prefill) == (2 if name.startswith("MLA") else 1)  # MLA: naive and absorbed
        assert all(r["tokens_per_s"] > 0 and r["context"] == 32 for r in prefill)
        if name.startswith("MLA"):
            assert ["naive" in prefill[0]["note"], "absorbed" in prefill[1]["note"]] == [True, True]
    kv = {r["variant"]: r["kv_bytes_per_token"] for r in rows if r["phase"] == "decode"}
    # tiny: 2 layers, 4 heads x 16, fp32; MLA 32 + 8 values per layer
    assert kv == {"GQA-2 (original)": 2 * 2 * 2 * 16 * 4, "MLA 32+8": 2 * 40 * 4, "MQA": 2 * 2 * 16 * 4,
                  "MHA": 2 * 2 * 4 * 16 * 4}
    hf = [r for r in rows if r["phase"] == "hf-dynamic"]
    assert [(r["batch"], r["context"]) for r in hf] == [(1, 32), (2, 64)]
    # transformers' rate is a difference of two timings: on a busy 2-core box and a tiny model it can
    # still come out <= 0 after the retries, which the row reports as no rate (None), never as a number
    assert all(r["status"] == "ok" and (r["tokens_per_s"] is None or r["tokens_per_s"] > 0) for r in hf)
    orig = [r for r in rows if r["phase"] == "decode" and r["variant"] == "GQA-2 (original)"]
    assert all(r["vs_original"] == pytest.approx(1.0) for r in orig)
    rate = {(r["batch"], r["context"]): r["tokens_per_s"] for r in hf}
    assert all((r.get("vs_hf_dynamic") is None) == (rate[(r["batch"], r["context"])] is None) for r in orig)
    assert all(r.get("vs_hf_dynamic") is None or r["vs_hf_dynamic"] > 0 for r in orig)
    # largest batch: 0.002 GiB budget less the weights, fp32 sequences of 64 tokens
    by_variant = {m["variant"]: m for m in result["max_batch"]}
    for name in names:
        m = by_variant[name]
        assert m["max_batch"] == m["estimate"] > 0
        assert m["max_batch"] * m["bytes_per_sequence"] <= m["free_gib"] * memory.GIB
    assert by_variant["MLA 32+8"]["max_batch"] > by_variant["GQA-2 (original)"]["max_batch"]
    at_max = [r for r in rows if r["phase"] == "decode@max-batch"]
    assert {r["variant"] for r in at_max} == set(names)
    s = result["summary"]
    assert s["mla_vs_original_decode"]["batch"] == 2 and s["mla_vs_original_decode"]["context"] == 64
    assert s["max_batch_ratio"]["ratio"] == pytest.approx(by_variant["MLA 32+8"]["max_batch"]
                                                          / by_variant["GQA-2 (original)"]["max_batch"])
    assert set(s["batch1_bandwidth_fraction"]) == set(names)

    table = report.write_outputs(result, json_path=str(tmp_path / "e2e.json"), markdown_path=str(tmp_path / "e2e.md"),
                              plot_dir=str(tmp_path / "plots"))
    assert table.splitlines()[0].startswith("decode-e2e-v1 on CPU")
    assert "| phase | variant | batch | context | tok/s | ms/step | KV bytes/token | peak GiB | % of BW limit" in table
    assert "Largest batch at context 64" in table and "Targets of issue 6" in table
    assert json.loads((tmp_path / "e2e.json").read_text())["rows"][0]["phase"] == "decode"
    for png in ("e2e_throughput.png", "e2e_memory.png"):
        data = (tmp_path / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_oom_rows_are_recorded_and_the_run_goes_on(monkeypatch):
    real_engine = e2e.E2EBench._engine

    def engine(self, model, batch, max_len, **kw):
        # the MHA variant runs out of memory above batch 1 in the grid and above 5 in the
        # search; the original above 8
        mha = model.config.n_kv_heads == model.config.n_heads and not model.config.is_mla
        if batch > 8 or (mha and batch > 5) or (mha and batch == 2 and max_len == 64):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB (simulated)")
        return real_engine(self, model, batch, max_len, **kw)

    monkeypatch.setattr(e2e.E2EBench, "_engine", engine)
    monkeypatch.setattr(e2e, "estimate_max_batch", lambda free, per_seq, headroom: 10)
    result = e2e.run_e2e(tiny_options(variants=("original", "mha")))
    rows = {(r["phase"], r["variant"], r["batch"], r["context"]): r for r in result["rows"]}
    oom = rows[("decode", "MHA", 2, 64)]
    assert oom["status"] == "OOM" and oom["tokens_per_s"] is None and "out of memory" in oom["note"]
    assert rows[("decode", "MHA", 1, 32)]["status"] == "ok"
    assert rows[("prefill", "MHA", 1, 32)]["status"] == "ok"  # the run went on after the OOM row
    by_variant = {m["variant"]: m for m in result["max_batch"]}
    assert by_variant["MHA"]["max_batch"] == 5
    assert by_variant["MHA"]["tries"] == [(10, False), (9, False), (8, False), (7, False), (6, False), (5, True)]
    assert by_variant["GQA-2 (original)"]["max_batch"] == 8
    assert by_variant["GQA-2 (original)"]["tries"] == [(10, False), (9, False), (8, True)]
    # failed tries of the search are not result rows; the fitted batch is timed
    at_max = [r for r in result["rows"] if r["phase"] == "decode@max-batch"]
    assert [(r["variant"], r["batch"], r["status"]) for r in at_max] == [("GQA-2 (original)", 8, "ok"), ("MHA", 5, "ok")]
    table = report.format_table(result)
    assert "| decode | MHA | 2 | 64 | OOM |" in table
    assert "10(OOM) 9(OOM) 8" in table  # the tries column


def test_time_budget_skips_rows():
    result = e2e.run_e2e(tiny_options(time_budget_s=0.0, variants=("original", "mla")))
    assert result["rows"] and all(r["status"] == "skipped" for r in result["rows"])


def test_cli_parses_and_runs(tmp_path, capsys):
    from mlakit.cli import main

    code = main(["bench", "e2e", "--preset", "tiny", "--device", "cpu", "--grid", "1x16", "--steps", "1",
                 "--warmup", "1", "--variants", "original,mla", "--max-batch-context", "0", "--prefill-tokens", "16",
                 "--no-hf", "--no-progress", "--json", str(tmp_path / "out.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("decode-e2e-v1 on CPU")
    data = json.loads((tmp_path / "out.json").read_text())
    assert {r["variant"] for r in data["rows"]} == {"GQA-2 (original)", "MLA 32+8"}
    assert data["max_batch"] == []


def test_named_model_is_loaded_as_the_original(tmp_path):
    from mlakit.testing.models import save_tiny

    _, path = save_tiny(tmp_path, "llama", 2)
    result = e2e.run_e2e(tiny_options(preset="llama3-8b", model=str(path), grid=((1, 16),), variants=("original", "mla"),
                                      max_batch_context=None, prefill_tokens=None, mla_rank=32, mla_rope=8,
                                      mla_from="shape"))
    assert [v["weights"] for v in result["variants"]] == [f"loaded {path}", "random normal"]
    assert [r["variant"] for r in result["rows"]] == ["GQA-2 (original)", "MLA 32+8"]
    assert result["rows"][0]["kv_bytes_per_token"] == 3 * 2 * 2 * 16 * 4  # 3 layers, 2 KV heads x 16, fp32


def test_named_model_mla_comes_from_the_converter(tmp_path, rel_err):
    """With a named model the MLA variant is the project's converter's output (by default
    at its 50% saving), not random weights of the same shape: the bench's MLA model
    gives the logits of a direct ``mlakit.convert`` of the same model."""
    from mlakit.convert.api import ConvertOptions, convert
    from mlakit.evaluate import calibration_tokens
    from mlakit.loading import load
    from mlakit.testing.models import save_tiny_with_tokenizer

    _, path = save_tiny_with_tokenizer(tmp_path, "llama", 2)
    opts = tiny_options(preset="llama3-8b", model=str(path), grid=((1, 16),), variants=("original", "mla"),
                        max_batch_context=None, prefill_tokens=None)
    bench = e2e.E2EBench(opts)
    result = bench.run()
    assert result["variants"][1]["weights"].startswith(f"converted from {path} by mlakit.convert")
    # 2 KV heads x 16 x 2 = 64 values/token/layer; 50% saving = 32 = rank 16 + rope 16 (the converter's default)
    mla_config = result["variants"][1]["config"]
    assert (mla_config["kv_lora_rank"], mla_config["qk_rope_head_dim"]) == (16, 16)
    assert [r["variant"] for r in result["rows"]] == ["GQA-2 (original)", "MLA 16+16"]
    assert any("converter" in note for note in result["notes"])
    variant = next(v for v in variants.make_variants(variants.config_of(str(path)), 16, 16, ("mla",)))
    variant.convert_from = str(path)
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    loaded = load(str(path))
    direct, _ = convert(loaded.model, calibration_tokens(loaded.tokenizer, ConvertOptions().calib_tokens),
                        ConvertOptions(kv_lora_rank=16, rope_dim=16, progress=False))
    with torch.no_grad():
        assert rel_err(bench._converted_model(variant)(tokens), direct(tokens)) <= 1e-5
