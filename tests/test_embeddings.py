"""Embeddings (`LanguageModel.embed`, POST /v1/embeddings) against llama.cpp's embedding
mode on the same file (llama-cpp-python, same pooling, L2-normalized as llama-server), and
through the official openai client (float and base64 encodings)."""

from __future__ import annotations

import base64

import httpx
import llama_cpp
import numpy as np
import openai
import pytest
import torch
from test_server import ServerProcess

import llmpress
from llmpress.errors import LlmpressError

TEXTS = ["The capital of France is Paris.", "def add(a, b):\n    return a + b",
         "Quantization makes models smaller."]
POOLING_CODES = {"mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                 "last": llama_cpp.LLAMA_POOLING_TYPE_LAST,
                 "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS}


@pytest.fixture(scope="module")
def lm(default_model_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield llmpress.load(default_model_path, ctx=512)
    torch.set_num_threads(threads)


def llama_cpp_embeddings(path, pooling: str) -> np.ndarray:
    ref = llama_cpp.Llama(str(path), embedding=True, pooling_type=POOLING_CODES[pooling],
                          n_ctx=512, n_threads=1, verbose=False)
    return np.array(ref.embed(TEXTS, normalize=True))


@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
def test_embeddings_match_llama_cpp(lm, default_model_path, pooling):
    ours = np.array(lm.embed(TEXTS, pooling=pooling))
    ref = llama_cpp_embeddings(default_model_path, pooling)
    assert ours.shape == ref.shape == (len(TEXTS), lm.model.cfg.dim)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # fast mode rounds activations to 8 bits as ggml does, not in the same order
    assert (ours * ref).sum(axis=1).min() > 0.999
    error = np.abs(ours - ref).max()
    assert error < 0.02
    # the tolerance tells texts apart: two texts' embeddings differ by far more (not so
    # the first token's state, cls: on this causal model it is nearly the same for all)
    if pooling != "cls":
        assert np.abs(ref[0] - ref[1]).max() > 3 * error


def test_embed_refuses_bad_input(lm):
    with pytest.raises(LlmpressError, match="pooling"):
        lm.embed("x", pooling="max")
    with pytest.raises(LlmpressError, match="outside the vocabulary"):
        lm.embed([10 ** 9])


@pytest.fixture(scope="module")
def server(default_model_path, tmp_path_factory):
    proc = ServerProcess(default_model_path, tmp_path_factory.mktemp("embed"))
    yield proc
    proc.close()


def test_openai_client_embeddings_float_and_base64(server, lm):
    client = server.client()
    expected = np.array(lm.embed(TEXTS))
    # no encoding_format: the client asks for base64 and decodes it itself; base64 asked
    # for explicitly reaches the caller as the string
    for fmt in (openai.NOT_GIVEN, "float", "base64"):
        reply = client.embeddings.create(model="smollm2", input=TEXTS, encoding_format=fmt)
        got = np.array([np.frombuffer(base64.b64decode(d.embedding), "<f4") if fmt == "base64"
                        else d.embedding for d in reply.data])
        assert [d.index for d in reply.data] == [0, 1, 2]
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert reply.usage.prompt_tokens == sum(len(lm.encode(t)) for t in TEXTS)
    one = client.embeddings.create(model="smollm2", input=TEXTS[0])
    np.testing.assert_allclose(one.data[0].embedding, expected[0], atol=1e-6)
    ids = client.embeddings.create(model="smollm2", input=lm.encode(TEXTS[1]))
    np.testing.assert_allclose(ids.data[0].embedding, expected[1], atol=1e-6)


@pytest.mark.parametrize("body, param", [
    ({"model": "smollm2"}, "input"),
    ({"model": "smollm2", "input": 5}, "input"),
    ({"model": "smollm2", "input": [""]}, "input"),
    ({"model": "smollm2", "input": [[1, 10 ** 9]]}, "input"),
    ({"model": "smollm2", "input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"model": "smollm2", "input": "x", "dimensions": 8}, "dimensions"),
])
def test_bad_embedding_requests_are_400(server, body, param):
    reply = httpx.post(server.base + "/v1/embeddings", json=body, timeout=60)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == param
