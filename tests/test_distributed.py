"""mx.distributed under the shim, on a real ring of ranks (`mlx.launch --backend ring -n 2`).

Nothing is mocked: every test starts real MLX ranks on 127.0.0.1 through `mlx.launch`
(see tests/distributed/launch.py for how their output, exit status and processes are
collected; the launcher itself exits 0 even when a rank fails, so each rank's own exit is
what is judged). "with the shim" is `mlx_threadsafe.install()` at the top of the rank
script (`--install`), `MLX_THREADSAFE=1` in the launcher's environment (inherited by every
rank), or `mlx-threadsafe run --` in front of the rank's python / of `mlx.launch`.

Measurements are printed (run with `-s` to see them). Ring ports: 18800-18899, a block per
launch under a file lock, so `pytest -n 2` is safe.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from distributed import launch as ring
from distributed.launch import EXIT_ABORT, NO_STREAM, launch
from distributed.serving import reference_answers, serve_on_ring

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "distributed")
LAUNCH_TIMEOUT = 150
SHIMS = {"off": ({}, []), "install": ({}, ["--install"]), "env": ({"MLX_THREADSAFE": "1"}, [])}


def _run(script, model=None, shim="off", extra=(), n=2, timeout=LAUNCH_TIMEOUT, independent_exits=False):
    env, flags = SHIMS[shim]
    args = ([str(model)] if model else []) + flags + list(extra)
    return launch(script, n=n, env=env, args=args, timeout=timeout, independent_exits=independent_exits)


def _measure(name, **values):
    print(f"\n[distributed] {name}: " + json.dumps(values, default=str))


@pytest.fixture(scope="module")
def models():
    from mlx_threadsafe.testing import build_lm

    return {arch: str(build_lm(arch)) for arch in ("llama", "llama3rope")}


def _reference_tokens(model: str, max_tokens: int = 8):
    """A one-process, non-distributed run (no launcher, no shim) at temperature 0."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("MLX_THREADSAFE", None)
    done = subprocess.run([sys.executable, os.path.join(SCRIPTS, "rank_sharded_generate.py"), model, "--reference",
                           "--max-tokens", str(max_tokens)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    tokens = json.loads(done.stdout.strip().splitlines()[-1])["tokens"]
    assert tokens, done.stdout
    return tokens


@pytest.fixture(scope="module")
def reference(models):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = _reference_tokens(models[arch])
        return cache[arch]

    return get


# ----------------------------------------------------------------------------- the harness


def test_the_launcher_gives_every_rank_the_ring_and_the_environment():
    plain = _run("rank_hello.py")
    env = _run("rank_hello.py", shim="env")
    for result, installed in ((plain, False), (env, True)):
        assert not result.timed_out, result.report()
        assert [r.returncode for r in result] == [0, 0], result.report()
        outcomes = [r.outcome for r in result]
        assert [o["rank"] for o in outcomes] == [0, 1] and {o["size"] for o in outcomes} == {2}
        assert {o["sum"] for o in outcomes} == {3.0}  # 1 + 2: the ring really sums
        assert {o["shim_installed"] for o in outcomes} == {installed}, result.report()
    assert {o.outcome["env_MLX_THREADSAFE"] for o in env} == {"1"}  # MLX_THREADSAFE=1 reaches every rank


# ------------------------------------------------- (a) sharded load on main, generate elsewhere


def _run_sharded_generate(model, shim, extra=()):
    # Without the shim every rank fails on its generate thread (before any collective) and
    # then aborts at exit: independent_exits, or the first rank to abort gets the other
    # SIGTERMed by mlx.launch before it has reported (CI stop 36: rank 0 killed, no outcome).
    return _run("rank_sharded_generate.py", model, shim, extra=extra, independent_exits=shim == "off")


def _assert_sharded_generate(result, shim, expected_tokens):
    assert not result.timed_out, result.report()
    outcomes = [r.outcome for r in result]
    assert all(outcomes), result.report()
    if shim == "off":
        for rank in result:  # the issue: every rank fails, on the thread that generates
            assert NO_STREAM + "cpu," in (rank.outcome["error"] or ""), result.report()
    else:
        for rank in result:
            assert rank.outcome["shim"] is True, result.report()
            assert rank.outcome["error"] is None, result.report()
            assert rank.outcome["tokens"] == expected_tokens, result.report()
            assert rank.returncode == 0 and EXIT_ABORT not in rank.stderr, result.report()


@pytest.mark.parametrize("shim", ["off", "install"])
def test_tensor_parallel_sharded_load_then_generate_on_another_thread(models, reference, shim):
    result = _run_sharded_generate(models["llama3rope"], shim)
    _measure(f"sharded_load(tensor) + generate on a thread, shim={shim}",
             ranks=[dict(rank=r.rank, rc=r.returncode, error=(r.outcome or {}).get("error"),
                         tokens=(r.outcome or {}).get("tokens"), aborted=r.aborted) for r in result],
             reference=reference("llama3rope"))
    _assert_sharded_generate(result, shim, reference("llama3rope"))


@pytest.mark.slow
@pytest.mark.parametrize("shim", ["env"])
def test_tensor_parallel_sharded_generate_with_the_shim_from_the_environment(models, reference, shim):
    result = _run_sharded_generate(models["llama3rope"], shim)
    _assert_sharded_generate(result, shim, reference("llama3rope"))


def test_pipeline_sharded_load_then_generate_on_another_thread(models, reference):
    from mlx_lm.models import llama

    if not hasattr(llama.LlamaModel, "pipeline"):
        pytest.skip("mlx-lm's llama has no `pipeline` (no PipelineMixin): sharded_load(pipeline_group=...) "
                    "raises 'The model does not support pipelining'")
    for shim in ("off", "install"):
        result = _run_sharded_generate(models["llama3rope"], shim, extra=["--pipeline"])
        _assert_sharded_generate(result, shim, reference("llama3rope"))


# ------------------------------------------------------- (b) generate on a thread, then exit


def _exit_runs(model, shim, runs):
    # independent_exits: one rank aborting must not get the other SIGTERMed by mlx.launch
    # before it reaches its own exit (that hid rank 0's exit in the first measurements).
    results = [_run("rank_thread_exit.py", model, shim, independent_exits=True) for _ in range(runs)]
    for result in results:
        assert not result.timed_out, result.report()
    return results


def _exit_table(results):
    return [[(r.returncode, r.aborted) for r in result] for result in results]


def _check_exits(models, reference, runs):
    """`runs`: launches per shim mode, {"off": K, "install": K}; no abort is allowed under the shim."""
    expected = reference("llama")
    table = {}
    for shim in ("off", "install"):
        results = _exit_runs(models["llama"], shim, runs[shim])
        table[shim] = results
        aborts = [sum(1 for result in results if result[rank].aborted) for rank in (0, 1)]
        _measure(f"generate on a worker thread then exit, shim={shim}, {runs[shim]} runs",
                 aborts_per_rank={f"rank{r}": f"{aborts[r]}/{runs[shim]}" for r in (0, 1)},
                 exits=_exit_table(results))
        for result in results:  # whatever happens at exit, the generation itself is right
            for rank in result:
                assert rank.outcome and rank.outcome["tokens"] == expected, result.report()
    for result in table["install"]:
        assert [(r.returncode, r.aborted) for r in result] == [(0, False), (0, False)], result.report()


def test_threads_that_generated_end_without_aborting_any_rank(models, reference):
    """One launch each way (~12 s a launch on this machine): without the shim measured only, with
    it no abort allowed (the sharded-generate test above is one more with-shim exit)."""
    _check_exits(models, reference, runs={"off": 1, "install": 1})


@pytest.mark.slow
def test_twenty_exits_per_rank_abort_zero_times_with_the_shim(models, reference):
    _check_exits(models, reference, runs={"off": 20, "install": 20})


@pytest.mark.slow
def test_three_exits_per_rank_each_way(models, reference):
    _check_exits(models, reference, runs={"off": 3, "install": 3})


# ------------------------------------------ (c) two threads of one rank, one group, all_sum


def _concurrent_sums(shim, sums=200):
    result = _run("rank_concurrent_allsum.py", shim=shim, extra=["--sums", str(sums)])
    assert not result.timed_out, result.report()
    assert all(r.outcome for r in result), result.report()
    _measure(f"2 threads x {sums} concurrent all_sum on one group, shim={shim}",
             ranks={f"rank{r.rank}": {name: dict(done=t["done"], wrong=t["wrong"], error=t["error"])
                                      for name, t in sorted(r.outcome["threads"].items())}
                    for r in result})
    return result


def test_concurrent_collectives_from_two_threads_are_wrong_without_the_shim():
    """The issue: 95-100% of the sums are wrong, and nothing is raised (measured: 94-99%)."""
    result = _concurrent_sums("off")
    wrong = sum(t["wrong"] for r in result for t in r.outcome["threads"].values())
    raised = [t["error"] for r in result for t in r.outcome["threads"].values() if t["error"]]
    assert wrong > 0 and not raised, result.report()


def test_the_second_thread_s_collective_raises_under_the_shim():
    """What the shim must do: refuse the second thread's collective, naming both threads.

    Thread allsum-A is the first to use the group on every rank (allsum-B starts once A's
    first sum is back, and A reads each sum with .item(), so its collectives stay pending);
    B's collective must raise ConcurrentCollectives (a RuntimeError) naming allsum-A and
    allsum-B, A's 200 sums must all be right, and nothing may hang.
    """
    result = _concurrent_sums("install")
    for rank in result:
        threads, report = rank.outcome["threads"], result.report()
        assert rank.outcome["stuck"] == [], report
        first, second = threads["allsum-A"], threads["allsum-B"]
        assert first["error"] is None and first["done"] == 200 and first["wrong"] == 0, report
        assert second["wrong"] == 0, report
        assert (second["error"] or "").startswith("ConcurrentCollectives: "), report
        assert "allsum-A" in second["error"] and "allsum-B" in second["error"], report


# ------------------------------------------------------------- (d) mlx_lm.server on 2 ranks


@pytest.fixture(scope="module")
def server_reference(models):
    return reference_answers(models["llama"])


def _serve(models, shim):
    out = serve_on_ring(models["llama"], shim)
    ranks = out["ranks"]
    _measure(f"mlx_lm.server on 2 ranks, shim={shim}",
             answers=out["answers"], error=out["error"], stop_seconds=out["stop_seconds"],
             killed_after_sigint=out["killed_after_sigint"], launcher_rc=ranks.launcher_returncode,
             ranks=[dict(rank=r.rank, rc=r.returncode, terminate_called=EXIT_ABORT in r.stderr) for r in ranks])
    return out


def _assert_served(out, reference_answers_):
    assert out["error"] is None, out["ranks"].report()
    assert out["answers"] == reference_answers_, out["ranks"].report()


def _assert_clean_stop(out):
    ranks = out["ranks"]
    assert not out["killed_after_sigint"] and out["stop_seconds"] <= 30, ranks.report()
    for rank in ranks:
        assert EXIT_ABORT not in rank.stderr, ranks.report()
        # 0, or -SIGINT: how Python ends a program whose main thread a Ctrl-C interrupted
        assert rank.returncode is not None and rank.returncode in (0, -signal.SIGINT), ranks.report()


def test_server_on_two_ranks_answers_without_the_shim(models, server_reference):
    """mlx-lm 0.32.2's server works on the ring without the shim; its SIGINT exit is measured only."""
    out = _serve(models, "off")
    _assert_served(out, server_reference)


def test_server_on_two_ranks_answers_and_every_rank_stops_cleanly_under_the_shim(models, server_reference):
    """4 concurrent chats answered as by one process; after a Ctrl-C (SIGINT to the launcher's
    process group) no rank aborts and the launcher returns within 30 s.

    Fails until the shim handles it: rank 1's main thread sits in `response_generator.join()`;
    on Python 3.11 the KeyboardInterrupt there marks the still-running generation thread as
    stopped (threading._wait_for_tstate_lock, bpo-45274), the interpreter finalizes under it
    and the rank aborts (-6, `terminate called without an active exception`).
    """
    out = _serve(models, "env")
    _assert_served(out, server_reference)
    _assert_clean_stop(out)


@pytest.mark.slow
@pytest.mark.parametrize("shim", ["run", "run-launcher"])
def test_server_on_two_ranks_under_the_runner(models, server_reference, shim):
    out = _serve(models, shim)
    _assert_served(out, server_reference)
    _assert_clean_stop(out)


@pytest.mark.slow
def test_server_sigint_aborts_per_rank_over_ten_runs(models, server_reference):
    """Ctrl-C (SIGINT to the launcher's group) on mlx_lm.server over 2 ranks, 10 runs each way.

    Measured before mlx_lm.server.stop_at_exit (mlx-lm 0.32.2, Python 3.11.7, 5 runs): without
    the shim rank 0 -6 in 4/5, rank 1 in 5/5; with it rank 0 0/5, rank 1 5/5. With it (10 runs,
    2026-11-28): without 5/10 and 10/10, with 0/10 and 0/10. Not solved: once in those 10 runs
    under the shim mlx.launch itself (which gets MLX_THREADSAFE=1 too) did not return within
    30 s after both ranks had exited; the count is measured, not asserted.
    """
    runs = 10
    counts = {}
    for shim in ("off", "env"):
        outs = [_serve(models, shim) for _ in range(runs)]
        for out in outs:
            _assert_served(out, server_reference)
        counts[shim] = {f"rank{r}": sum(1 for out in outs if out["ranks"][r].returncode == -6
                                        or EXIT_ABORT in out["ranks"][r].stderr) for r in (0, 1)}
        counts[shim]["launcher_killed"] = sum(1 for out in outs if out["killed_after_sigint"])
    _measure(f"mlx_lm.server SIGINT exits -6 over {runs} runs", **counts)
    assert (counts["env"]["rank0"], counts["env"]["rank1"]) == (0, 0), counts


def test_port_blocks_are_exclusive():
    with ring.port_block() as first, ring.port_block() as second:
        assert set(first).isdisjoint(second)
        assert all(18800 <= p <= 18899 for p in first + second)
