"""Log-likelihood scoring through a real server that echoes prompt log-probabilities: llama-cpp-python's
OpenAI-compatible server (``python -m llama_cpp.server``) serving the eval tests' tiny Mistral converted to an
F32 GGUF (`gguf_export`). Per-request log-likelihoods, zero-shot choices and greedy generations are compared
with the HF backend on the HF folder; the continuation split is checked both ways (local tokenizer, and the
server's text offsets)."""

import sys

import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama.cpp server) is not installed")
pytest.importorskip("gguf", reason="gguf writes the GGUF file the llama.cpp server reads")

from eval_fixtures import tiny_hf_model_dir  # noqa: E402
from gguf_export import write_gguf  # noqa: E402
from served_fixtures import free_port, running_server  # noqa: E402
from clinmega.evaluation.backends.hf import HFBackend  # noqa: E402
from clinmega.evaluation.backends.openai_compat import OpenAIBackend  # noqa: E402

TOLERANCE = 2e-3  # absolute, per summed log-likelihood: llama.cpp's F32 kernels vs torch's (values are O(10-100))

REQUESTS = [("Question: Which vitamin prevents scurvy?\nAnswer:", " A"),
            ("Question: Which vitamin prevents scurvy?\nAnswer:", " B"),
            ("Question: Which vitamin prevents scurvy?\nAnswer:", " Vitamin C, found in citrus fruit"),
            ("Context: The patient has a fever.\nQuestion: Is this an infection?\nAnswer:", " maybe"),
            ("Trailing space ", "moves")]


@pytest.fixture(scope="module")
def hf():
    import torch

    torch.set_num_threads(1)
    return HFBackend.from_pretrained(tiny_hf_model_dir(), batch_size=4)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    model = write_gguf(tiny_hf_model_dir(), tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", "tiny",
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "1",
           "--logits_all", "true", "--verbose", "false"]
    with running_server(cmd, f"http://127.0.0.1:{port}/v1/models", timeout=300):
        yield f"http://127.0.0.1:{port}"


def test_loglikelihoods_equal_the_hf_backend(llama_server, hf):
    expected = hf.loglikelihood(REQUESTS)
    with_tokenizer = OpenAIBackend(llama_server, "tiny", tokenizer=hf.tokenizer, concurrency=2).loglikelihood(REQUESTS)
    some = [0, 2, 4]  # the server spends ~30 ms a prompt token on its top-logprob sort: not all twice
    by_offsets = OpenAIBackend(llama_server, "tiny", concurrency=2).loglikelihood([REQUESTS[i] for i in some])
    assert with_tokenizer == pytest.approx(expected, abs=TOLERANCE)
    assert by_offsets == pytest.approx([expected[i] for i in some], abs=TOLERANCE)
    assert len({round(v, 1) for v in expected}) == len(expected)  # distinct values: a mix-up would show
    print("max |served - hf|:", max(abs(a - b) for a, b in zip(with_tokenizer + by_offsets,
                                                                 expected + [expected[i] for i in some])))


def test_greedy_generations_equal_the_hf_backend(llama_server, hf):
    prompts = ["Question: Which organ produces insulin?\nAnswer:", "Hello"]
    assert OpenAIBackend(llama_server, "tiny", concurrency=2).generate(prompts, 8) == hf.generate(prompts, 8)
