"""The OpenAI-compatible backend against real local servers on CPU, serving the eval tests' tiny Mistral:

* ``transformers serve`` (the HF folder, offline): greedy generations equal the HF backend's, through
  ``/v1/completions`` and the eval CLI; it ignores ``echo``/``logprobs``, so log-likelihood scoring is refused
  with the fields named and the strategies that work;
* a real HTTP proxy in front of it that answers 503 / 400 / too late: retries with backoff, no retry of a
  client error, the request timeout, a refused connection, requests in flight.
"""

import json
import time

import pytest

from eval_fixtures import tiny_hf_model_dir
from served_fixtures import FlakyProxy, free_port, running_server, transformers_serve_cmd
from clinmega.cli import main as clinmega_main
from clinmega.evaluation.backends.hf import HFBackend
from clinmega.evaluation.backends.openai_compat import OpenAIBackend, ServerCapabilityError, ServerError
from clinmega.evaluation.benchmarks import load_benchmark
from clinmega.evaluation.scoring import run_strategy
from clinmega.evaluation.strategies import PRESETS, Strategy

pytest.importorskip("openai", reason="transformers serve needs the openai package (transformers[serving])")


@pytest.fixture(scope="module")
def model_dir():
    return tiny_hf_model_dir()


# The served copy adds a chat template that renders the user message as is after BOS, so the chat route sees
# the same tokens as the completions route and the HF backend.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}"
                 "{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def served_dir(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("served-model")
    for f in model_dir.iterdir():
        (out / f.name).symlink_to(f)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


@pytest.fixture(scope="module")
def tserve(served_dir):
    port = free_port()
    with running_server(transformers_serve_cmd(served_dir, port), f"http://127.0.0.1:{port}/health", timeout=300):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def hf(model_dir):
    import torch

    torch.set_num_threads(1)
    return HFBackend.from_pretrained(model_dir, batch_size=4)


def served(url, served_dir, **kw):
    return OpenAIBackend(url, str(served_dir), **kw)


ITEMS = lambda: load_benchmark("medqa_4options")[:3] + load_benchmark("pubmedqa")[:2]  # noqa: E731


def test_greedy_generations_equal_the_hf_backend(tserve, served_dir, hf):
    strategy = Strategy("generate", scoring="generate", max_new_tokens=10)
    items = ITEMS()
    over_http = run_strategy(served(tserve, served_dir, concurrency=3), items, [], strategy)
    local = run_strategy(hf, items, [], strategy)
    texts = [r.outputs[0] for r in over_http]
    assert texts == [r.outputs[0] for r in local]
    assert [r.pred for r in over_http] == [r.pred for r in local]
    assert all(texts) and len(set(texts)) > 1  # real, prompt-dependent text

    # a stop string that occurs mid-text: both cut before it
    prompt = "Question: Which organ produces insulin?\nAnswer:"
    full = hf.generate([prompt], 10)[0]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut_here = hf.generate([prompt], 10, stop=[stop])[0]
    assert cut_here == full[: full.index(stop)]
    assert served(tserve, served_dir).generate([prompt], 10, stop=[stop]) == [cut_here]

    chat = served(tserve, served_dir, api="chat", concurrency=2).generate([prompt, "Hello"], 10)
    assert chat == hf.generate([prompt, "Hello"], 10)


def test_loglikelihood_refused_with_the_failing_fields_and_working_strategies(tserve, served_dir, tmp_path):
    backend = served(tserve, served_dir)
    with pytest.raises(ServerCapabilityError) as err:
        backend.loglikelihood([("Question: Is this a test?\nAnswer:", " yes")])
    message = str(err.value)
    assert "echo=true, logprobs=1" in message and "choices[0].logprobs is None" in message
    assert "cot" in message and "self_consistency" in message and "medprompt" in message

    # the CLI checks before it evaluates anything and exits 2 with the message
    out = tmp_path / "ll"
    rc = clinmega_main(["eval", "--backend", "openai", "--endpoint", tserve, "--model", str(served_dir),
                        "--benchmarks", "pubmedqa", "--strategies", "generate,zero_shot", "--limit", "2",
                        "--out", str(out)])
    assert rc == 2 and not (out / "parts").exists()


def test_cli_generation_strategy_through_the_server(tserve, served_dir, hf, tmp_path):
    out = tmp_path / "gen"
    rc = clinmega_main(["eval", "--backend", "openai", "--endpoint", tserve + "/v1", "--model", str(served_dir),
                        "--benchmarks", "medqa_4options", "--strategies", "generate", "--limit", "2",
                        "--max-new-tokens", "4", "--out", str(out), "--bootstrap", "50", "served.concurrency=2"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["backend"] == "openai" and data["meta"]["model"] == f"{served_dir} at {tserve}/v1"
    strategy = Strategy("generate", scoring="generate", max_new_tokens=4)
    expected = run_strategy(hf, load_benchmark("medqa_4options")[:2], [], strategy)
    assert [i["outputs"] for i in data["items"]] == [r.outputs for r in expected]


def test_retries_with_backoff_then_succeeds(tserve, served_dir, hf):
    prompt = "Question: Which vitamin prevents scurvy?\nAnswer:"
    with FlakyProxy(tserve, fail=2, status=503) as proxy:
        start = time.monotonic()
        text = served(proxy.url, served_dir, retries=3, backoff=0.2).generate([prompt], 6)
        elapsed = time.monotonic() - start
    assert text == hf.generate([prompt], 6)
    assert proxy.attempts == 3
    assert elapsed >= 0.2 + 0.4  # two backoff sleeps: 0.2 s, then 0.4 s

    with FlakyProxy(tserve, fail=5, status=429) as proxy, pytest.raises(ServerError, match="failed 2 times; last: HTTP 429"):
        served(proxy.url, served_dir, retries=1, backoff=0.01).generate([prompt], 6)
    assert proxy.attempts == 2

    with FlakyProxy(tserve, fail=5, status=400) as proxy, pytest.raises(ServerError, match="refused: HTTP 400"):
        served(proxy.url, served_dir, retries=3, backoff=0.01).generate([prompt], 6)
    assert proxy.attempts == 1  # a client error is not retried


def test_request_timeout_and_refused_connection():
    with FlakyProxy("http://127.0.0.1:9", fail=5, delay=1.5) as proxy:  # answers late, never forwards
        start = time.monotonic()
        with pytest.raises(ServerError, match="failed 2 times; last: ReadTimeout"):
            OpenAIBackend(proxy.url, "tiny", timeout=0.3, retries=1, backoff=0.01).generate(["Hello"], 4)
        assert time.monotonic() - start < 1.5  # gave up on each attempt after 0.3 s, not after the answer
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerError, match="failed 3 times; last: ConnectError"):
        OpenAIBackend(closed, "tiny", retries=2, backoff=0.01).generate(["Hello"], 4)


def test_requests_run_concurrently_and_keep_their_order(tserve, served_dir, hf):
    prompts = [f"Question: What is item {n}?\nAnswer:" for n in range(6)]
    with FlakyProxy(tserve) as proxy:
        texts = served(proxy.url, served_dir, concurrency=4).generate(prompts, 4)
    assert proxy.max_in_flight > 1 and proxy.attempts == len(prompts)
    assert texts == hf.generate(prompts, 4)


def test_bad_keys_are_named():
    with pytest.raises(ValueError, match="served.endpoint 'localhost:8000'"):
        OpenAIBackend("localhost:8000", "m")
    with pytest.raises(ValueError, match="served.model"):
        OpenAIBackend("http://localhost:8000", "")
    assert OpenAIBackend("http://h:1", "m").base == "http://h:1/v1"
    assert OpenAIBackend("http://h:1/api/v1/", "m").base == "http://h:1/api/v1"
    assert PRESETS["zero_shot"].scoring == "loglikelihood"
