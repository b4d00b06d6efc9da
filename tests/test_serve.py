"""python -m refusal_jax.serve on a tiny ChatML model, driven by the official `openai` client: greedy responses are
`refusal_jax.generate`'s for every variant (chat style "model"), streamed text equals the non-streamed text,
requests of different variants run concurrently in one batch, bad requests get 4xx and the server keeps serving,
and SIGTERM lets running requests finish before the process exits 0."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import refusal_jax as rj
from tests.tiny_chat import chat_tokenizer

openai = pytest.importorskip("openai")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPTS = ["write a poem for a friend", "how to steal money", "explain the cat", "make a cake",
           "build a weapon", "tips for healthy food"]
MAX_TOKENS = 12
KEY = "test-key"
LAYER = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from refusal_jax.convert import checkpoint
    from refusal_jax.model.config import tiny_config
    from refusal_jax.model.params import init_random

    root = tmp_path_factory.mktemp("serve")
    tok = chat_tokenizer()
    tok.chat_template = CHATML
    cfg = tiny_config("qwen2", vocab_size=len(tok), n_layers=3)
    model_dir = checkpoint.save(root / "model", cfg, init_random(cfg, jax.random.key(0), scale=0.5), tok,
                                source="tiny test model")
    run = root / "run"
    (run / "generate_directions").mkdir(parents=True)
    rng = np.random.default_rng(0)
    direction = rng.normal(size=cfg.d_model).astype(np.float32) * 3
    np.save(run / "direction.npy", direction)
    (run / "direction_metadata.json").write_text(json.dumps({"pos": -1, "layer": LAYER}))
    mean = rng.normal(size=(2, cfg.n_layers, cfg.d_model))
    np.save(run / "generate_directions" / "mean_harmless.npy", mean)
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "refusal_jax.serve", "--model", str(model_dir), "--direction",
                             str(run), "--served-model-name", "tiny", "--port", str(port), "--api-key", KEY,
                             "--slots", "4", "--max-model-len", "128", "--no-progress"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120)
    deadline = time.time() + 300
    while True:
        assert proc.poll() is None, (root / "server.log").read_text()
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            assert time.time() < deadline, "the server did not start in 300 s"
            time.sleep(1)
    model = rj.load_model(str(model_dir), progress=False)
    yield dict(client=client, proc=proc, port=port, model=model, direction=direction,
               mean=mean[-1, LAYER], log=root / "server.log")
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)
    log.close()


def _chat(client, model, prompt, **kw):
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                         max_tokens=MAX_TOKENS, temperature=0, **kw)
    return out


def _expected(served, intervention):
    return rj.generate(served["model"], PROMPTS, intervention, max_new_tokens=MAX_TOKENS, chat_style="model",
                       batch_size=4)


def test_models_lists_the_variants(served):
    ids = [m.id for m in served["client"].models.list().data]
    assert ids == ["tiny", "tiny+ablation", "tiny+addition", "tiny+edit-plain", "tiny+edit-projected"]


def test_greedy_variants_equal_generate_concurrently(served):
    """All prompts of all variants sent at once from 8 client threads (rows of different variants share
    batches); every response is `refusal_jax.generate`'s completion under that variant's intervention."""
    from refusal_jax.method import edits

    cfg, d = served["model"].cfg, served["direction"]
    projected, _ = edits.edit_basis(d, "projected", served["mean"])
    ivs = {"tiny": None, "tiny+ablation": rj.Intervention.ablation(cfg, d),
           "tiny+addition": rj.Intervention.addition(cfg, d, LAYER, 1.0),
           "tiny+edit-projected": rj.Intervention.ablation(cfg, projected)}
    want = {name: _expected(served, iv) for name, iv in ivs.items()}
    assert len({tuple(w) for w in want.values()}) == len(want), "the variants must differ"
    jobs = [(name, i) for name in ivs for i in range(len(PROMPTS))]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda job: _chat(served["client"], job[0], PROMPTS[job[1]]), jobs))
    for (name, i), res in zip(jobs, got):
        assert res.choices[0].message.content == want[name][i], (name, i)
        assert res.model == name
        assert res.usage.completion_tokens >= 1 and res.usage.prompt_tokens > 0
        assert res.choices[0].finish_reason in ("stop", "length")


def test_stream_equals_non_stream_and_adhoc_intervention(served):
    client = served["client"]
    cfg, d = served["model"].cfg, served["direction"]
    coeff = -2.5
    want = _expected(served, rj.Intervention.addition(cfg, d, 2, coeff))
    adhoc = dict(extra_body={"intervention": {"kind": "addition", "layer": 2, "coefficient": coeff}})
    for i in (0, 1):
        whole = _chat(client, "tiny", PROMPTS[i], **adhoc)
        assert whole.choices[0].message.content == want[i]
        pieces, finish, usage = [], None, None
        for event in _chat(client, "tiny", PROMPTS[i], stream=True, stream_options={"include_usage": True}, **adhoc):
            if event.choices:
                pieces.append(event.choices[0].delta.content or "")
                finish = event.choices[0].finish_reason or finish
            if event.usage:
                usage = event.usage
        assert "".join(pieces) == want[i]
        assert finish == whole.choices[0].finish_reason and usage.total_tokens == whole.usage.total_tokens


def test_sampling_is_reproducible_with_a_seed_and_stop_strings_cut(served):
    client = served["client"]
    kw = dict(model="tiny+ablation", messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=MAX_TOKENS)
    a = client.chat.completions.create(temperature=1.5, top_p=0.9, seed=11, **kw).choices[0].message.content
    b = client.chat.completions.create(temperature=1.5, top_p=0.9, seed=11, **kw).choices[0].message.content
    assert a == b
    greedy = client.chat.completions.create(temperature=0, **kw).choices[0].message.content
    word = greedy.split()[2]
    cut = client.chat.completions.create(temperature=0, stop=[word], **kw).choices[0]
    assert cut.message.content == greedy[:greedy.find(word)].strip() and cut.finish_reason == "stop"


def test_bad_requests_get_4xx_and_the_server_keeps_serving(served):
    import urllib.error
    import urllib.request

    client, port = served["client"], served["port"]
    bad = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=b"{not json",
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=30)
    assert err.value.code == 400 and "JSON" in json.loads(err.value.read())["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        _chat(client, "nope", "hello")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a " * 200}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
    with pytest.raises(openai.BadRequestError):
        _chat(client, "tiny+ablation", "hi", extra_body={"intervention": {"kind": "addition"}})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    assert _chat(client, "tiny", PROMPTS[0]).choices[0].message.content == _expected(served, None)[0]


def test_disconnect_frees_the_slot_and_sigterm_finishes_running_requests(served):
    """A streaming client that leaves after its first token frees its slot; then SIGTERM while 4 requests run:
    each gets its whole completion and the server exits 0."""
    import urllib.request

    client, proc = served["client"], served["proc"]

    def health():
        with urllib.request.urlopen(f"http://127.0.0.1:{served['port']}/health", timeout=30) as r:
            return json.loads(r.read())

    before = health()["released"]
    for _ in range(6):  # more abandoned streams than slots, each asking for all the cache has room for
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[0]}],
                                                temperature=0, stream=True)
        next(iter(stream))
        stream.close()
    deadline = time.time() + 60
    while health()["running"] and time.time() < deadline:
        time.sleep(0.2)
    assert health()["running"] == 0 and health()["released"] > before  # the slots were freed, not run out
    want = _expected(served, None)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_chat, client, "tiny", PROMPTS[i]) for i in range(4)]
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGTERM)
        got = [f.result().choices[0].message.content for f in futures]
    assert got == want[:4]
    assert proc.wait(60) == 0, served["log"].read_text()
