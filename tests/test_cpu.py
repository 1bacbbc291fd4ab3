"""The CPU side: the compiler probe and its fallback seen from the command line, --threads,
and the dtype --dtype auto picks on a CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

GLMREPL = str(Path(sys.executable).with_name("glmrepl"))
INT4 = Path(__file__).parent / "data" / "chatglm" / "chatglm2-int4-tiny"


def run(*args, stdin: str = "", **env):
    return subprocess.run(
        [GLMREPL, *args], input=stdin, capture_output=True, text=True, timeout=240, env=dict(os.environ, **env)
    )


def test_without_a_compiler_the_reply_comes_and_stats_say_which_path(tmp_path):
    greedy = ("--temperature", "0", "--max-new-tokens", "6", "--device", "cpu", "--threads", "1")
    hidden = run(
        str(INT4),
        *greedy,
        stdin="hello\n/stats\n/device\n",
        CXX=str(tmp_path / "missing-g++"),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
    )
    assert hidden.returncode == 0, hidden.stderr
    reply, stats, *device = hidden.stdout.strip().splitlines()
    assert f"path: int4 torch ops (no C++ compiler: {tmp_path / 'missing-g++'} not found)" in stats
    assert "6 tokens" in stats and "1 compute thread (--threads)" in hidden.stdout
    assert not list((tmp_path / "cache").glob("**/*.so"))
    plain = run(str(INT4), *greedy, stdin="hello\n", XDG_CACHE_HOME=str(tmp_path / "cache2"))
    assert plain.returncode == 0 and plain.stdout.strip().splitlines()[0] == reply  # same greedy reply


@pytest.mark.parametrize("value", ["0", "-2"])
def test_threads_must_be_positive(value):
    result = run("--threads", value, "-p", "x")
    assert result.returncode == 2 and "--threads must be 1 or more" in result.stderr


def test_threads_are_applied_and_default_to_the_physical_cores():
    import torch

    from glmrepl.engine.cpu import machine as cpu

    before = torch.get_num_threads()
    try:
        cpu.request_threads(1)
        assert cpu.apply_threads() == 1 == torch.get_num_threads()
        assert cpu.threads_line() == "1 compute thread (--threads)"
        cpu.request_threads(None)
        assert cpu.apply_threads() == cpu.physical_cores() == torch.get_num_threads()
        assert cpu.threads_line().endswith("(the physical cores available)")
    finally:
        cpu.request_threads(None)
        torch.set_num_threads(before)


def test_more_threads_than_cores_are_taken_with_a_warning(monkeypatch):
    from glmrepl.engine.cpu import machine as cpu

    monkeypatch.setattr(cpu, "physical_cores", lambda: 2)
    try:
        assert cpu.request_threads(2) is None and cpu.request_threads(None) is None
        warning = cpu.request_threads(64)
        assert warning is not None and warning.startswith("--threads 64 is more than the 2 cores")
    finally:
        cpu.request_threads(None)


def test_physical_cores_count_hyperthreads_once(monkeypatch):
    from glmrepl.engine.cpu import machine as cpu

    info = "".join(f"processor\t: {n}\nphysical id\t: 0\ncore id\t\t: {n // 2}\n\n" for n in range(4))
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: info)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    cpu.physical_cores.cache_clear()
    try:
        assert cpu.physical_cores() == 2
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
        cpu.physical_cores.cache_clear()
        assert cpu.physical_cores() == 1
    finally:
        cpu.physical_cores.cache_clear()


@pytest.mark.parametrize(
    "native,stored,expected,why",
    [
        ("AMX", "bfloat16", "bfloat16", "natively (AMX)"),
        ("AVX512-BF16", "float16", "bfloat16", "natively (AVX512-BF16)"),
        (None, "bfloat16", "float32", "no native bfloat16"),
        ("AMX", "float32", "float32", "stored in float32"),
    ],
)
def test_auto_dtype_on_cpu(monkeypatch, native, stored, expected, why):
    from glmrepl.engine.cpu import machine as cpu
    from glmrepl.engine.devices.modes import plan_placement

    monkeypatch.setattr(cpu, "native_bf16", lambda: native)
    placement = plan_placement("cpu", "auto", stored)
    assert placement.dtype == expected and why in placement.reason
    assert plan_placement("cpu", "float32", stored).dtype == "float32"  # an explicit dtype is kept


def test_auto_dtype_of_a_quantized_model_is_float32_for_its_fused_layers(monkeypatch, qwen_checkpoint):
    from glmrepl.engine.cpu import machine as cpu
    from glmrepl.engine.devices.modes import plan_placement
    from glmrepl.engine.models.checkpoint import inspect_checkpoint
    from glmrepl.engine.models.loading import LoadRequest, placement_for

    monkeypatch.setattr(cpu, "native_bf16", lambda: "AMX")
    placement = plan_placement("cpu", "auto", "bfloat16", quantized=True)
    assert placement.dtype == "float32" and "quantized" in placement.reason
    assert plan_placement("cpu", "bfloat16", "bfloat16", quantized=True).dtype == "bfloat16"  # asked for: kept
    info = inspect_checkpoint(qwen_checkpoint)
    assert placement_for(LoadRequest(path=qwen_checkpoint, mode="cpu", quantize=4), info).dtype == "float32"


def test_native_bf16_is_read_from_the_processor_flags(monkeypatch):
    import torch

    from glmrepl.engine.cpu import machine as cpu

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    for flags, expected in (
        ("fpu avx2 fma", None),
        ("avx2 avx512f avx512_bf16", "AVX512-BF16"),
        ("avx512_bf16 amx_bf16 amx_tile", "AMX"),
    ):
        monkeypatch.setattr(cpu, "_cpuinfo", lambda flags=flags: f"processor\t: 0\nflags\t\t: {flags}\n")
        cpu.native_bf16.cache_clear()
        assert cpu.native_bf16() == expected
    cpu.native_bf16.cache_clear()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to count threads")
def test_a_thread_done_with_compute_lets_its_openmp_threads_go():
    """A pool left behind by one thread would make the decoding thread's pool sleep between
    regions (cpu.release_thread_pool); this one goes when released, and the next region works."""
    import threading

    import torch

    from glmrepl.engine.cpu.machine import release_thread_pool

    counts: dict[str, int] = {}

    def compute() -> None:
        torch.set_num_threads(4)
        before = len(os.listdir("/proc/self/task"))
        big = torch.ones(4_000_000) * 2  # parallel regions: the pool's helper threads start
        counts["with pool"] = len(os.listdir("/proc/self/task"))
        release_thread_pool()
        counts["released"] = len(os.listdir("/proc/self/task"))
        counts["again"] = int((big * 3).sum().item() == 24_000_000)
        counts["before"] = before

    worker = threading.Thread(target=compute)
    worker.start()
    worker.join()
    if counts["with pool"] == counts["before"]:
        pytest.skip("torch ran the region on one thread here")
    assert counts["released"] < counts["with pool"]
    assert counts["again"] == 1
