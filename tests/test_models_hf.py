"""HF checkpoint conversion: logits parity with transformers' own PyTorch models.

Torch is a test-only dependency (requirements-test.txt); without it these tests skip.
Each family is a tiny random model whose weights (biases and norm scales included) are
perturbed away from HF's init, so every tensor, its orientation and every config switch
influence the logits the tests compare.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from drift_jax.models import PRESETS, Transformer, preset
from drift_jax.models.hf import config_from_hf, config_to_hf, from_pretrained, load_tokenizer, save_pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            max_position_embeddings=256)
SEQ = 48  # longer than the llama3 scaling's original_max_position_embeddings below


def _hf_model(family: str):
    if family == "qwen2":  # GQA, q/k/v bias, tied head
        cfg = transformers.Qwen2Config(**TINY, num_attention_heads=4, num_key_value_heads=2,
                                       rope_theta=1e6, tie_word_embeddings=True)
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":  # q/k norm, untied head, head_dim != hidden / heads
        cfg = transformers.Qwen3Config(**TINY, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=32, tie_word_embeddings=False)
        cls = transformers.Qwen3ForCausalLM
    else:  # llama3 rope scaling: wavelengths 6.3, 20, 63, ... span all three bands (8 .. 32)
        rope = {"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        cfg = transformers.LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-5,
                                       rope_scaling=rope, tie_word_embeddings=False)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.2 * torch.randn_like(p) + (1.0 if "norm" in name else 0.0))
    return model


def _tokens():
    return np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, SEQ))


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


@nnx.jit
def _forward(model, tokens_bt):
    return model(tokens_bt)


def _logits(model, tokens):
    # One compiled forward: op-by-op dispatch of the eager model is several times slower.
    return np.asarray(_forward(model, jnp.asarray(tokens)), np.float32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(family)`` -> (folder of the HF-saved checkpoint, HF logits on ``_tokens()``),
    built once per family for the whole module."""
    cache = {}

    def get(family):
        if family not in cache:
            model = _hf_model(family)
            path = tmp_path_factory.mktemp(family)
            model.save_pretrained(path)
            cache[family] = path, _hf_logits(model, _tokens())
        return cache[family]

    return get


FAMILIES = ["qwen2", "qwen3", "llama"]


@pytest.mark.parametrize("family", FAMILIES)
def test_load_matches_transformers(family, saved):
    path, want = saved(family)
    model = from_pretrained(path, dtype=jnp.float32)
    assert model.cfg.qkv_bias == (family == "qwen2") and model.cfg.qk_norm == (family == "qwen3")
    np.testing.assert_allclose(_logits(model, _tokens()), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_loads_in_transformers(family, saved, tmp_path):
    path, want = saved(family)
    save_pretrained(from_pretrained(path, dtype=jnp.float32), tmp_path, hf_config_extra={"eos_token_id": 3})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    assert type(hf).__name__ == arch
    assert hf.config.eos_token_id == 3
    np.testing.assert_allclose(_hf_logits(hf.eval(), _tokens()), want, atol=TOL, rtol=0)


def test_llama3_rope_scaling_is_exercised(saved):
    """The parity above would be vacuous if the sequence never reached the scaled regime."""
    path, want = saved("llama")
    graphdef, state = nnx.split(from_pretrained(path, dtype=jnp.float32))
    unscaled = nnx.merge(graphdef, state)
    unscaled.cfg = unscaled.cfg.replace(rope_scaling=None)
    assert np.abs(_logits(unscaled, _tokens()) - want).max() > 100 * TOL


def test_sharded_safetensors_load(tmp_path):
    model = _hf_model("qwen3")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ours = from_pretrained(tmp_path, dtype=jnp.float32)
    np.testing.assert_allclose(_logits(ours, _tokens()), _hf_logits(model, _tokens()), atol=TOL, rtol=0)


def test_params_land_on_given_shardings(saved):
    """Rows of each matrix split over all devices (run with several host devices via
    XLA_FLAGS=--xla_force_host_platform_device_count=4 to see real splits)."""
    path, want = saved("llama")
    mesh = Mesh(np.array(jax.devices()), ("x",))
    n = len(jax.devices())
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    abstract = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    shardings = jax.tree.map(
        lambda x: NamedSharding(mesh, P("x") if x.ndim == 2 and x.shape[0] % n == 0 else P()), abstract)
    model = from_pretrained(path, dtype=jnp.float32, shardings=shardings)
    placed = jax.tree.map(lambda x: x.sharding, nnx.state(model))
    assert jax.tree.leaves(placed) == jax.tree.leaves(shardings)
    np.testing.assert_allclose(_logits(model, _tokens()), want, atol=TOL, rtol=0)


def test_bfloat16_roundtrip_is_bit_exact(tmp_path):
    model = _hf_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf", dtype=jnp.bfloat16)
    assert ours.embed_tokens[...].dtype == jnp.bfloat16
    save_pretrained(ours, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.bfloat16)
    want, got = model.state_dict(), back.state_dict()
    assert sorted(want) == sorted(got)
    for name in want:
        assert torch.equal(want[name], got[name]), name


@pytest.mark.parametrize("corruption", ["missing", "unexpected", "shape"])
def test_bad_checkpoint_names_the_tensor(corruption, tmp_path):
    from safetensors.torch import load_file, save_file

    _hf_model("qwen2").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    if corruption == "missing":
        del tensors[name]
    elif corruption == "unexpected":
        name = "model.layers.1.mlp.extra.weight"
        tensors[name] = torch.zeros(3)
    else:
        tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        from_pretrained(tmp_path, dtype=jnp.float32)


# -- configs: hand-written dicts as found on the hub ---------------------------------

QWEN25_05B = {  # Qwen/Qwen2.5-0.5B-Instruct (transformers 4 layout)
    "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 896,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
    "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936,
}
LLAMA32_1B = {  # meta-llama/Llama-3.2-1B
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 128256,
}
QWEN3_06B = {  # Qwen/Qwen3-0.6B, as transformers 5 re-saves it (rope under rope_parameters)
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "intermediate_size": 3072, "max_position_embeddings": 40960, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"}, "sliding_window": None,
    "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151936,
}


def test_config_from_hub_dicts():
    assert config_from_hf(QWEN25_05B) == preset("qwen2.5-0.5b")
    assert config_from_hf(LLAMA32_1B) == preset("llama-3.2-1b")
    q3 = config_from_hf(QWEN3_06B, dtype=jnp.bfloat16)
    assert (q3.head_dim, q3.num_heads, q3.num_kv_heads, q3.rope_theta) == (128, 16, 8, 1e6)
    assert q3.qk_norm and not q3.qkv_bias and q3.rope_scaling is None and q3.tie_word_embeddings
    assert q3.dtype == q3.param_dtype == jnp.bfloat16


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_to_hf_roundtrips(name):
    assert config_from_hf(config_to_hf(preset(name))) == preset(name)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "model_type='mistral'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_config_from_hf_rejects_what_the_model_lacks(change, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf({**LLAMA32_1B, **change})


def test_load_tokenizer_requires_chat_template(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    base = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    base.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=base, unk_token="[UNK]")
    tokenizer.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="chat_template"):
        load_tokenizer(tmp_path / "plain")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(tmp_path / "chat")
    loaded = load_tokenizer(tmp_path / "chat")
    prompt = loaded.apply_chat_template([{"role": "user", "content": "hello world"}], tokenize=False)
    assert prompt == "hello world "
