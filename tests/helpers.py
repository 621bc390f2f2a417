"""Helpers shared by several test modules (no test module imports another).

``tests/`` has no ``__init__.py``, so pytest's default ("prepend") import mode puts this
folder on ``sys.path`` before it imports ``conftest.py`` and the test modules: they import
these as ``from helpers import ...``.
"""

from __future__ import annotations

import functools
import json
import os
import signal

import numpy as np
import orbax.checkpoint as ocp
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from drift_jax.envs.base import FEEDBACK
from drift_jax.envs.secret import SecretGuessEnv, scripted_episode

# Qwen2.5's template, minus tool calls: a default system message when none is given.
CHATML_TEMPLATE = (
    "{% if messages and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Words both the toy word-level tokenizer and ``chatml_tokenizer`` know.
WORDS = ["guess", "the", "secret", "puzzle", "maybe", "7", "42", "B", "<answer>A</answer>", "<answer>C</answer>"]


def chatml_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE (GPT-2 / Qwen pre-tokenisation) trained here, with ChatML."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    corpus = [" ".join(WORDS), FEEDBACK, "You are a helpful assistant.", "user\nassistant\nsystem\n"]
    backend.train_from_iterator(corpus * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


@functools.lru_cache(maxsize=None)
def run_module():
    """experiments/run.py as a module: ``experiments.run``, imported once (it defines absl
    flags, which a second copy of the module would define again)."""
    import importlib

    return importlib.import_module("experiments.run")


def tiny_hf_checkpoint(path, param_dtype: str = "float32", generation_config: dict | None = None):
    """A random-init Qwen2-shaped checkpoint and a ChatML tokenizer, in HF's file formats
    (weights stored in ``param_dtype``); returns the model."""
    import jax.numpy as jnp
    from flax import nnx

    from drift_jax.models import ModelConfig, Transformer, save_pretrained

    tokenizer = chatml_tokenizer()
    cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, tie_word_embeddings=True,
                      param_dtype=jnp.dtype(param_dtype))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    save_pretrained(model, path, hf_config_extra={"eos_token_id": tokenizer.eos_token_id})
    tokenizer.save_pretrained(path)
    if generation_config is not None:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(generation_config, f)
    return model


def good_records(n: int = 4, prefix: str = "g") -> list[dict]:
    """``n`` valid release-format records of the toy task (scripted, so no model needed)."""
    env = SecretGuessEnv()
    rng = np.random.default_rng(0)
    return [scripted_episode(env, q, rng, p_repeat=0.5, p_format_error=0.2).to_record()
            for q in env.make_questions(n, seed=0, prefix=prefix)]


def write_lines(path, lines) -> str:
    """Write lines as given (str as UTF-8, bytes as they are), each followed by a newline;
    returns the path as a string."""
    path.write_bytes(b"".join((line.encode() if isinstance(line, str) else line) + b"\n" for line in lines))
    return str(path)


def group_lines(pid: str, n: int, **changes) -> list[str]:
    """``n`` good records of prompt ``pid`` as JSON lines, with ``changes`` applied."""
    return [json.dumps({**r, "prompt_id": pid, **changes}) for r in good_records(n)]


# -- kill switches (installed in a child process by the kill tests) ------------------------

def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def install_kill(kind: str, n: int, suffix: str) -> None:
    """SIGKILL this process at the n-th matching event on a path ending with ``suffix``.

    torn: halfway through the n-th ``os.write`` (half its bytes land, as when a kill
    interrupts a write); lines: at the first ``os.fsync`` after which the file holds n
    complete lines; save: when Orbax
    starts committing step n (its files written, the temporary directory not renamed).
    """
    count = 0
    if kind == "torn":
        write = os.write

        def torn_write(fd, data):
            nonlocal count
            if _fd_path(fd).endswith(suffix):
                count += 1
                if count == n:
                    write(fd, bytes(data)[: len(data) // 2])
                    die()
            return write(fd, data)

        os.write = torn_write
    elif kind == "lines":
        fsync = os.fsync

        def fsync_then_die(fd):
            fsync(fd)
            if _fd_path(fd).endswith(suffix):
                with open(_fd_path(fd), "rb") as f:
                    if f.read().count(b"\n") >= n:
                        die()

        os.fsync = fsync_then_die
    elif kind == "save":
        cls = ocp.path.atomicity.AtomicRenameTemporaryPath
        finalize = cls.finalize

        async def die_in_commit(self, *args, **kwargs):
            tmp = self.get()
            if str(tmp.parent).endswith(suffix) and tmp.name.split(".")[0] == str(n):
                die()
            return await finalize(self, *args, **kwargs)

        cls.finalize = die_in_commit
    else:
        raise ValueError(f"unknown kill kind {kind!r}")


def spy_samplers(monkeypatch) -> list:
    """The kinds of the samplers whose ``run`` is called, in call order (a test then
    sees which sampler a caller really played on)."""
    from drift_jax.rollout.engine import Engine
    from drift_jax.rollout.static import StaticSampler

    ran = []
    for cls in (Engine, StaticSampler):
        def run(self, source, on_finish, real=cls.run):
            ran.append(self.kind)
            return real(self, source, on_finish)

        monkeypatch.setattr(cls, "run", run)
    return ran
