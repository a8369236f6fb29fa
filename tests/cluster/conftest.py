"""Fixtures of the cluster tests: one local Ray for the session, the single-process reference
outputs, and a cluster starter (helpers and constants are in pd_util.py).

Ray is started once (``num_cpus`` is logical: the CI machine has 2 cores and the actors mostly
wait). Each test module starts the cluster it needs in a module-scoped fixture and shares it:
a start costs ~20-30 s (one process and one model load per worker).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from pd_util import GREEDY, MAX_TOKENS, PROMPTS, Reference, base_config


@pytest.fixture(scope="session")
def ray_session():
    """The local Ray instance of this directory's tests (started on first use)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=16, include_dashboard=False,
                 namespace="pdserve-tests", log_to_driver=True)
    yield ray
    if started:
        ray.shutdown()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    """After the last test of this directory, stop its Ray: tests elsewhere (the multi-node
    test in tests/deploy) start their own, and one process holds one Ray connection."""
    result = yield
    if nextitem is None or nextitem.path.parent != Path(__file__).parent:
        import ray

        ray.shutdown()
    return result


@pytest.fixture(scope="session")
def reference(smol_engine, smollm2_path: Path) -> Reference:
    """Greedy outputs for PROMPTS of the single-process engine (batched) and transformers."""
    from transformers import AutoModelForCausalLM

    engine = smol_engine()
    ids = {p: engine.encode_prompt(p) for p in PROMPTS}
    out: dict[str, list[int]] = {}
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"ref-{i}", prompt_token_ids=ids[p], params=GREEDY)
        out[f"ref-{i}"] = []
    while engine.has_unfinished():
        for c in engine.step():
            out[c.request_id].extend(c.token_ids)
    ours = {p: out[f"ref-{i}"] for i, p in enumerate(PROMPTS)}

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    hf = {}
    with torch.no_grad():
        for p in PROMPTS:
            x = torch.tensor([ids[p]])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_TOKENS,
                               do_sample=False, pad_token_id=0)
            hf[p] = y[0, len(ids[p]):].tolist()
    return Reference(ids, ours, hf)


@pytest.fixture(scope="session")
def start_cluster(ray_session, smollm2_path: Path) -> Callable[..., Any]:
    """``start(**config overrides) -> PDCluster`` on the session's Ray; the caller shuts it
    down (which leaves Ray running)."""
    from pdserve.cluster.config import ClusterConfig
    from pdserve.cluster.launcher import PDCluster

    def start(**overrides: Any) -> PDCluster:
        cluster = PDCluster.start(ClusterConfig.from_dict(base_config(**overrides)),
                                  model_path=smollm2_path)
        assert not cluster.started_ray
        return cluster

    return start
