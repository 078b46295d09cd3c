import json

import pytest
import torch

from mlakit import MlakitError, ModelConfig, Transformer, preset
from mlakit.loading import load, save_checkpoint


def small(**kw):
    shape = dict(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=48)
    return ModelConfig(**{**shape, **kw})


def test_json_round_trip(tmp_path):
    config = small(attention="mla", kv_lora_rank=[4, 6], qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                   qk_rope_freq_indices=[0, 3])
    config.save(tmp_path)
    assert ModelConfig.load(tmp_path) == config


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(n_kv_head=2), "unknown keys \\['n_kv_head'\\]"),
    (lambda d: d.pop("dim"), "missing keys \\['dim'\\]"),
    (lambda d: d.update(format_version=99), "format_version"),
])
def test_load_refuses_bad_keys(tmp_path, edit, message):
    data = small().to_dict()
    edit(data)
    (tmp_path / "mlakit.json").write_text(json.dumps(data))
    with pytest.raises(MlakitError, match=message):
        ModelConfig.load(tmp_path)


@pytest.mark.parametrize("kw,message", [
    (dict(n_kv_heads=3), "multiple"),
    (dict(attention="mla"), "kv_lora_rank"),
    (dict(attention="mla", kv_lora_rank=[4], qk_rope_head_dim=4, v_head_dim=4), "entries for 2 layers"),
    (dict(attention="mla", kv_lora_rank=4, qk_rope_head_dim=3, v_head_dim=4), "even"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "yarn"),
])
def test_invalid_configs_are_explained(kw, message):
    with pytest.raises(MlakitError, match=message):
        small(**kw)


def test_checkpoint_round_trip_is_atomic(tmp_path, rel_err):
    model = Transformer(small(attention="mla", kv_lora_rank=6, qk_rope_head_dim=4, qk_nope_head_dim=4,
                              v_head_dim=8, latent_norm=True)).init_random(seed=3)
    path = save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers
    loaded = load(path).model
    tokens = torch.randint(0, 50, (2, 9))
    assert rel_err(loaded(tokens), model(tokens)) == 0
    with pytest.raises(MlakitError, match="already exists"):
        save_checkpoint(model, path)


def test_failed_save_leaves_nothing(tmp_path):
    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full")

    model = Transformer(small())
    with pytest.raises(MlakitError, match="disk full"):  # one error line naming the output (mlakit.io)
        save_checkpoint(model, tmp_path / "ckpt", tokenizer=Broken())
    assert list(tmp_path.iterdir()) == []


def test_presets():
    assert preset("llama3-8b").n_kv_heads == 8
    assert preset("smollm2-135m").kv_values_per_token(0) == 384  # PROTOCOL.md
    with pytest.raises(MlakitError, match="llama3-8b"):
        preset("gpt5")
