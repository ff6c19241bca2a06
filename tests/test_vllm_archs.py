"""Every architecture vLLM loads here also loads over the network, bit for bit.

Real vLLM model classes on vLLM's CPU platform, TP=2 over gloo, tiny random checkpoints written by transformers
(see tiny_models.py): Phi (through vLLM's Transformers backend, whose ``lm_head.bias`` exists only when the
checkpoint holds one), Qwen2 with tied embeddings, a DeepSeek-V2-shaped model (multi-head latent attention,
routed and shared experts), Mixtral, Gemma, Gemma 2 (sliding window), Qwen2-MoE, Phi-3, Mamba and Jamba (hybrid).

Two instances of two ranks each load every architecture in turn, in the same four processes (vllm_worker.py): the
source from the checkpoint (vLLM's default loader), then the new instance from a folder holding only the json
files, so only a network load can fill it. Every runtime tensor (parameters, buffers, tensors kept as module
attributes) must be the same on both, bit for bit, under the same names and shapes.

The MoE models (DeepSeek-V2, Mixtral, Qwen2-MoE, Jamba) call ``_C::prepack_moe_weight``, vLLM's compiled CPU op
that reorders expert weights into its MoE kernel's blocked layout, while processing their weights; this CPU build
lacks it, so the worker registers a pure-torch stand-in (a plain copy) through ``torch.library`` (see
``vllm_worker.register_cpu_op_stand_ins``). Both instances run the same stand-in, so the comparison holds.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import HERE
from test_vllm import START_TIMEOUT, VENV_ENV, Instance, _free_port

ARCHS = ["phi", "qwen2-tied", "deepseek-v2", "mixtral", "gemma", "gemma2", "qwen2-moe", "phi3", "mamba", "jamba"]
MISMATCH = "qwen2-tied-wide"
WORLD = 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-archs")


@pytest.fixture(scope="module")
def checkpoints(workdir: Path) -> Path:
    """``ARCH`` (checkpoint) and ``ARCH-no-weights`` (json files only) for every architecture."""
    path = workdir / "models"
    path.mkdir()
    script = [sys.executable, str(HERE / "tiny_models.py"), str(path), *ARCHS, MISMATCH]
    subprocess.run(script, check=True, env=VENV_ENV, capture_output=True)
    for arch in ARCHS:
        assert list((path / arch).glob("*.safetensors")), f"{arch}: the checkpoint has no weight file"
        assert not list((path / f"{arch}-no-weights").glob("*.safetensors"))
    return path


def _step(instance: Instance, model_dir: Path, extra: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    """Have every rank of ``instance`` load one more model in its running process, and return their results."""
    paths = [instance.dir / f"{tag}-rank{rank}.json" for rank in range(WORLD)]
    line = {"model": str(model_dir), "extra": extra}
    for rank, proc in enumerate(instance.procs):
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({**line, "result": str(paths[rank])}) + "\n")
        proc.stdin.flush()
    deadline = time.monotonic() + START_TIMEOUT
    while not all(p.exists() for p in paths):
        for rank, proc in enumerate(instance.procs):
            if proc.poll() is not None:
                pytest.fail(f"{instance.name} rank {rank} exited with {proc.returncode}:\n{instance.log_tail(rank)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{instance.name} did not finish loading {tag} in {START_TIMEOUT} s:\n{instance.log_tail(0)}")
        time.sleep(0.2)
    return [json.loads(p.read_text()) for p in paths]


Results = list[dict[str, Any]]  # one per rank, as vllm_worker.py writes them


@dataclasses.dataclass
class Loads:
    source: dict[str, Results]  # arch -> the source's results (from the checkpoint)
    new: dict[str, Results]  # arch -> the new instance's results (from the source)
    new_instance: Instance


@pytest.fixture(scope="module")
def loads(workdir: Path, checkpoints: Path) -> Iterator[Loads]:
    """Both instances load every architecture in turn; the new instance also tries one mismatched model."""
    port = _free_port(WORLD)
    sources = [{"device_id": rank, "sources": [f"127.0.0.1:{port + rank}"]} for rank in range(WORLD)]
    source_extra = {"LISTEN_PORT": port}
    # no weight files: a failed network load must show as an error, not as a disk load's error
    # it serves while it loads (RELAY, the default): each architecture's load goes through a relay of its own
    new_extra = {"SOURCE": sources, "FALLBACK": False}
    first = ARCHS[0]
    source = Instance(workdir, "source", checkpoints / first, WORLD, {"MODEL": first, **source_extra})
    # started at once (vLLM's imports overlap the source's start), it loads nothing until told
    new = Instance(workdir, "new", Path("-"), WORLD, {})
    try:
        out = Loads({}, {}, new)
        for arch in ARCHS:
            if arch == first:
                out.source[arch] = source.results()
            else:
                out.source[arch] = _step(source, checkpoints / arch, {"MODEL": arch, **source_extra}, arch)
            out.new[arch] = _step(new, checkpoints / f"{arch}-no-weights", {"MODEL": arch, **new_extra}, arch)
            if arch == "qwen2-tied":
                # the same model name and vLLM class, another model (a wider MLP), weight files at hand (FALLBACK)
                extra = {"MODEL": arch, "SOURCE": sources, "SERVE": False}
                out.new[MISMATCH] = _step(new, checkpoints / MISMATCH, extra, MISMATCH)
        yield out
    finally:
        new.close()
        source.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_loads_over_the_network_bit_exact(loads: Loads, arch: str) -> None:
    source, new = loads.source[arch], loads.new[arch]
    for rank in range(WORLD):
        assert "error" not in source[rank], f"source rank {rank}: {source[rank].get('message')}"
        assert "error" not in new[rank], f"new instance rank {rank}: {new[rank].get('message')}"
        assert source[rank]["outcome"]["path"] == "disk"
        outcome = new[rank]["outcome"]
        assert outcome["path"] == "network", outcome
        assert outcome["bytes"] > 0
        assert outcome["relayed"] and outcome["served_at"], outcome
        assert new[rank]["shapes"] == source[rank]["shapes"]
        assert new[rank]["digests"] == source[rank]["digests"]  # every parameter and buffer, bit for bit
        assert new[rank]["attributes"] == source[rank]["attributes"]  # and tensors kept as module attributes
    # TP=2 really shards: the two ranks hold different halves of the vocabulary embedding
    embed = next(name for name in source[0]["digests"] if "embed" in name)
    assert source[0]["digests"][embed] != source[1]["digests"][embed]


def test_phi_lm_head_bias_made_while_reading_the_checkpoint_arrives_too(loads: Loads) -> None:
    """vLLM's Transformers backend makes ``lm_head.bias`` in ``load_weights``; the network path creates it from the
    source's manifest (a declared empty slot), then receives it like every other tensor."""
    for rank in range(WORLD):
        assert "lm_head.bias" in loads.source["phi"][rank]["digests"]
        assert loads.new["phi"][rank]["digests"]["lm_head.bias"] == loads.source["phi"][rank]["digests"]["lm_head.bias"]
        assert "created lm_head.bias (bfloat16[128])" in loads.new_instance.log_text(rank)
        # the retry's relay was built anew on the completed tensor set: the one kept describes the model as it runs
        assert "changed after loading" not in loads.new_instance.log_text(rank)


def test_a_remaining_mismatch_falls_back_naming_the_tensors_and_what_to_do(loads: Loads) -> None:
    for rank, result in enumerate(loads.new[MISMATCH]):
        assert "error" not in result, result.get("message")
        outcome = result["outcome"]
        assert outcome["path"] == "disk" and outcome["bytes"] is None, outcome  # nothing received
        reason = outcome["reason"]
        assert "ManifestMismatchError" in reason, reason
        assert "'model.layers.0.mlp.gate_up_proj.weight': shape" in reason, reason
        assert "must run the same model" in reason and "same vLLM version" in reason, reason
        # the warning line says the same, and the strict check created nothing to paper over the difference
        log = loads.new_instance.log_text(rank)
        assert f"could not load over the network, loading from disk: {reason}" in log
        assert "mlp.gate_up_proj.weight (" not in log
