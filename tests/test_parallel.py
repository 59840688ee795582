"""Tensor, expert and pipeline parallel on CPU with gloo: ranks started by the tests (torch.multiprocessing
spawn on loopback) load shares of tiny checkpoints and must give the single-process logits and tokens.

Starting processes that import torch costs seconds, so one spawned job runs every case of a world size
and writes its findings; the tests read them.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

import tramontane
from tramontane.engine.drafters import Speculation
from tramontane.loading import load_model, save_model
from tramontane.loading.common import expected_shapes
from tramontane.loading.gguf_write import write_gguf
from tramontane.parallel import ParallelConfig, ParallelError
from tramontane.parallel.shard import stage_layers
from tramontane.parallel.topology import core_share
from tramontane.step_backends import NativeBlocks, choose_backend

from .tiny import COMMON, TINY, save_hf

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds a whole spawned job may take
# wider feed-forward and heads than tiny.py's, so that column shards hold whole int4 groups / Q4_0 blocks
WIDE = dict(COMMON, intermediate_size=128)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tokens(length: int = 20) -> torch.Tensor:
    return torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------- checkpoints
def make_checkpoints(root: Path) -> dict[str, Path]:
    """name -> checkpoint path: HF folders of every tiny model, native folders and GGUF files made from them."""
    paths: dict[str, Path] = {}
    for name in TINY:
        paths[f"{name}-hf"] = root / f"{name}-hf"
        save_hf(name, paths[f"{name}-hf"])
    for name in ("mistral-nowindow", "mixtral"):
        paths[f"{name}-native"] = root / f"{name}-native"
        save_model(load_model(paths[f"{name}-hf"]), paths[f"{name}-native"], to="native")
    for name in ("mistral-window", "llama-tied"):
        model = load_model(paths[f"{name}-hf"])
        paths[f"{name}-gguf"] = root / f"{name}.gguf"
        write_gguf(paths[f"{name}-gguf"], model.args, _unfused(model))
    wide_cls, wide_extra = TINY["mistral-window"]
    torch.manual_seed(0)
    wide = transformers.AutoModelForCausalLM.from_config(wide_cls(**WIDE, **wide_extra), attn_implementation="eager")
    with torch.no_grad():
        for p in wide.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 1.0)
    paths["wide-hf"] = root / "wide-hf"
    wide.save_pretrained(paths["wide-hf"])
    paths["wide-int4-native"] = root / "wide-int4-native"
    save_model(load_model(paths["wide-hf"], quantize="int4"), paths["wide-int4-native"], to="native")
    model = load_model(paths["wide-hf"])
    for qtype in ("Q4_0", "Q8_0"):
        paths[f"wide-{qtype}-gguf"] = root / f"wide-{qtype}.gguf"
        write_gguf(paths[f"wide-{qtype}-gguf"], model.args, _unfused(model), qtype=qtype)
    return paths


def _unfused(model: tramontane.Transformer) -> dict[str, torch.Tensor]:
    from tramontane.fuse import unfused_state_dict

    state = unfused_state_dict(model.state_dict(), model)
    return {k: v for k, v in state.items() if k in expected_shapes(model.args)}


# (case, checkpoint, load_model keywords, parallel); each runs on every rank of a 2-rank job
CASES_2: list[tuple[str, str, dict[str, Any], Any]] = [
    ("mistral-window-hf-tp", "mistral-window-hf", {}, "tensor"),
    ("mistral-nowindow-native-tp", "mistral-nowindow-native", {}, "tensor"),
    ("mixtral-native-expert", "mixtral-native", {}, "tensor"),
    ("mixtral-hf-tensor-moe", "mixtral-hf", {}, {"tp": 2, "moe": "tensor"}),
    ("llama-tied-hf-tp", "llama-tied-hf", {}, "tensor"),
    ("llama-tied-gguf-tp", "llama-tied-gguf", {}, "tensor"),
    ("mistral-window-gguf-tp", "mistral-window-gguf", {}, "tensor"),
    ("wide-int8-tp", "wide-hf", {"quantize": "int8"}, "tensor"),
    ("wide-int4-tp", "wide-hf", {"quantize": "int4"}, "tensor"),
    ("wide-int4-saved-tp", "wide-int4-native", {}, "tensor"),
    ("wide-Q4_0-gguf-tp", "wide-Q4_0-gguf", {}, "tensor"),
    ("llama-tied-int8-tp", "llama-tied-hf", {"quantize": "int8"}, "tensor"),
    ("mistral-window-pp", "mistral-window-hf", {}, "pipeline"),
    ("llama-tied-pp", "llama-tied-hf", {}, "pipeline"),
    ("mixtral-int8-pp", "mixtral-hf", {"quantize": "int8"}, "pipeline"),
    # two groups of sequences in flight (engine/runner.py's decode groups): the same tokens as one process
    ("mistral-window-pp-micro", "mistral-window-hf", {}, {"pp": 2, "micro_batches": 2}),
    ("mixtral-int8-pp-micro", "mixtral-hf", {"quantize": "int8"}, {"pp": 2, "micro_batches": 2}),
]
# (case, checkpoint, load_model keywords, parallel): must raise ValueError on every rank
ERRORS_2 = [
    ("Q8_0-column-blocks", "wide-Q8_0-gguf", {}, "tensor"),  # wo: 32 columns per rank, Q8_0 units of 64
    ("int4-column-groups", "mistral-window-hf", {"quantize": "int4"}, "tensor"),  # w2: 48 columns per rank
    ("world-size", "mistral-window-hf", {}, {"tp": 4}),
]


def _compare(case: str, path: Path, kw: dict[str, Any], parallel: Any) -> dict[str, Any]:
    ref = load_model(path, **kw)
    model = load_model(path, **kw, parallel=parallel)
    # Quantized layers multiply more than 16 rows by dequantizing tiles (KernelPolicy.prefill_tile), in bf16
    # where the CPU has it, which rounds each rank's partial sums: 2 x 8 rows keep them on the kernels,
    # whose remaining differences `tolerance` describes.
    quantized = bool(kw) or "Q" in case or "int" in case
    x = tokens(8 if quantized else 20)
    with torch.inference_mode():
        want, got = ref(x), model(x)
    prompts = [[1, 5, 9, 3], [7, 2]]
    greedy = [g.tokens for g in tramontane.generate(model, prompts, max_tokens=10)]
    sampled = [g.tokens for g in tramontane.generate(model, prompts, max_tokens=10, temperature=1.0)]
    # drafts of one process's answer, every third one wrong from its third token: every rank verifies the
    # same drafts in one step, accepts some and rejects some
    answer = tramontane.generate(ref, prompts[:1], max_tokens=10)[0].tokens
    drafts = Speculation(Replay(len(prompts[0]), answer), 4)
    speculative = tramontane.generate(model, prompts[:1], max_tokens=10, speculative=drafts)[0].tokens
    return {
        "shape": list(got.shape), "error": (got - want).abs().max().item(), "scale": want.abs().max().item(),
        "quantized": quantized, "native_stack": isinstance(choose_backend(model), NativeBlocks),
        "greedy": greedy, "greedy_ref": [g.tokens for g in tramontane.generate(ref, prompts, max_tokens=10)],
        "sampled": sampled, "speculative": speculative, "speculative_ref": answer, "drafted": drafts.drafter.calls,
        "params": sum(t.numel() for t in [*model.parameters(), *model.buffers()]),
        "params_ref": sum(t.numel() for t in [*ref.parameters(), *ref.buffers()]),
    }


class Replay:
    """A drafter proposing a known answer to a prompt of `start` tokens, every third proposal wrong."""

    def __init__(self, start: int, answer: list[int]) -> None:
        self.start, self.answer, self.calls = start, answer, 0

    def propose(self, key: Any, tokens: list[int], k: int) -> list[int]:
        self.calls += 1
        out = self.answer[len(tokens) - self.start :][:k]
        if self.calls % 3 == 0 and len(out) > 2:
            out[2] = (out[2] + 1) % 128
        return out

    def forget(self, key: Any) -> None:
        pass


def _overlap(path: Path) -> list[str]:
    """What the first stage does, in order, while 2 groups of a pipeline decode: 's' a send to the next
    stage, 'w' a wait for a group's logits."""
    gen = sys.modules["tramontane.engine.runner"]  # where the decode groups' logits are waited for
    model = load_model(path, parallel={"pp": 2, "micro_batches": 2})
    log: list[str] = []
    topology, send, wait = model.parallel, model.parallel.send_next, gen.wait_all

    def logged_send(x: torch.Tensor) -> None:
        log.append("s")
        send(x)

    def logged_wait(works: list[Any]) -> None:
        log.append("w")
        wait(works)

    topology.send_next, gen.wait_all = logged_send, logged_wait  # type: ignore[method-assign]
    try:
        tramontane.generate(model, [[1, 5, 9, 3], [7, 2]], max_tokens=3)
    finally:
        gen.wait_all = wait
    return log


def _worker(rank: int, world: int, port: int, out: str, job: str, paths: dict[str, str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    results: dict[str, Any] = {}
    try:
        if job == "cases":
            for case, ckpt, kw, parallel in CASES_2:
                results[case] = _compare(case, Path(paths[ckpt]), kw, parallel)
            for case, ckpt, kw, parallel in ERRORS_2:
                try:
                    load_model(Path(paths[ckpt]), **kw, parallel=parallel)
                    results[case] = None
                except ValueError as e:
                    results[case] = str(e)
            results["overlap"] = _overlap(Path(paths["llama-tied-hf"]))
        elif job == "mixed":  # 4 ranks: tp 2 inside each of 2 pipeline stages
            wide = Path(paths["wide-hf"])
            results["tp2-pp2"] = _compare("tp2-pp2", wide, {}, {"tp": 2, "pp": 2})
            results["tp2-pp2-int8"] = _compare("tp2-pp2-int8", wide, {"quantize": "int8"}, {"tp": 2, "pp": 2})
            results["tp2-pp2-micro"] = _compare("tp2-pp2-micro", wide, {}, {"tp": 2, "pp": 2, "micro_batches": 2})
        elif job == "dead":  # rank 1 dies after loading; rank 0 must fail, not hang
            model = load_model(Path(paths["mistral-window-hf"]), parallel="tensor")
            dist.barrier()
            if rank == 1:
                os._exit(0)  # abruptly, no goodbye to its peers (0: so spawn does not kill rank 0 too)
            time.sleep(1)
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    model(tokens())
                results["raised"] = None
            except ParallelError as e:
                results["raised"] = str(e)
            results["seconds"] = time.perf_counter() - t0
    finally:
        Path(out, f"{job}-{rank}.json").write_text(json.dumps(results))
        if job != "dead":
            dist.destroy_process_group()


def spawn(job: str, world: int, out: Path, paths: dict[str, Path], check: bool = True) -> list[dict[str, Any]]:
    ctx = mp.start_processes(_worker, args=(world, free_port(), str(out), job, {k: str(v) for k, v in paths.items()}),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 1)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"spawned job {job!r} did not finish in {TIMEOUT} s")
    except mp.ProcessExitedException:
        if check:
            raise
    return [json.loads((out / f"{job}-{r}.json").read_text()) for r in range(world)
            if (out / f"{job}-{r}.json").exists()]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_checkpoints(tmp_path_factory.mktemp("parallel"))


# the tests that read `two_ranks` run on one pytest-xdist worker (`make test`), so its two ranks spawn once
ON_TWO_RANKS = pytest.mark.xdist_group("two_ranks")


@pytest.fixture(scope="module")
def two_ranks(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn("cases", 2, tmp_path_factory.mktemp("two"), checkpoints)


# ---------------------------------------------------------------------------------- tests
def tolerance(r: dict[str, Any]) -> float:
    """How far a share's logits may be from one process's. Float layers: summation order only. Quantized
    ones round activations (to int8 in blocks of 32, or to bf16 on AMX tiles), and rounding is not
    continuous: a partial sum that differs in its last bit can round one activation the other way, and
    a shard can take another kernel than the whole matrix (AMX takes whole blocks of 32 columns only).
    That moves logits by a fraction of a percent; a wrong cut moves them by their whole size."""
    return (2e-2 if r["quantized"] else 1e-4) * max(1.0, r["scale"])


@ON_TWO_RANKS
@pytest.mark.parametrize("case", [c[0] for c in CASES_2])
def test_logits_and_greedy_equal_one_process(two_ranks: list[dict[str, Any]], case: str) -> None:
    for rank, results in enumerate(two_ranks):
        r = results[case]
        assert r["shape"][2] == 128, f"rank {rank}: full logits on every rank"
        assert r["error"] <= tolerance(r), f"rank {rank}: logits differ by {r['error']}"
        assert r["greedy"] == r["greedy_ref"], f"rank {rank}: greedy tokens differ from one process"
        assert r["speculative"] == r["speculative_ref"] and r["drafted"] > 0, f"rank {rank}: speculative tokens differ"
        assert r["params"] < r["params_ref"], f"rank {rank}: holds the whole model, not a share"
    assert two_ranks[0][case]["sampled"] == two_ranks[1][case]["sampled"], "ranks sampled different tokens"


@ON_TWO_RANKS
@pytest.mark.parametrize("case", ["mistral-window-pp", "llama-tied-pp"])
def test_pipeline_stages_decode_through_the_native_stack(two_ranks: list[dict[str, Any]], case: str) -> None:
    # the same kernels as one process: integer kernels' rounding then cannot make the answers differ
    assert all(results[case]["native_stack"] for results in two_ranks)


@ON_TWO_RANKS
@pytest.mark.parametrize(("case", "words"), [
    ("Q8_0-column-blocks", ["wo", "Q8_0", "tp 2"]),
    ("int4-column-groups", ["w2", "48", "group"]),
    ("world-size", ["tp 4", "2"]),
])
def test_shares_that_cannot_be_cut_are_clear_errors(two_ranks: list[dict[str, Any]], case: str,
                                                     words: list[str]) -> None:
    for results in two_ranks:
        message = results[case]
        assert message is not None, f"{case}: loaded without an error"
        assert all(w in message for w in words), message


def test_tensor_and_pipeline_combined_on_four_ranks(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    results = spawn("mixed", 4, tmp_path, checkpoints)
    for rank, res in enumerate(results):
        for case in ("tp2-pp2", "tp2-pp2-int8", "tp2-pp2-micro"):
            r = res[case]
            assert r["error"] <= tolerance(r), f"rank {rank} {case}: {r['error']}"
            assert r["greedy"] == r["greedy_ref"]
    assert len({json.dumps(r["tp2-pp2"]["sampled"]) for r in results}) == 1


@ON_TWO_RANKS
def test_the_first_stage_starts_the_next_group_before_the_last_stage_answers(
        two_ranks: list[dict[str, Any]]) -> None:
    # once both prompts decode, each step sends both groups on before it waits for their logits: the
    # first stage computes group 2 while the last computes group 1
    first, last = ("".join(r["overlap"]) for r in two_ranks)
    assert "ssw" in first, first
    assert "s" not in last and "w" in last, last  # the last stage sends nothing; it waits for its broadcasts


def test_a_dead_rank_makes_the_others_fail_not_hang(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    results = spawn("dead", 2, tmp_path, checkpoints, check=False)
    survivor = results[0]
    assert survivor["raised"] is not None and "rank 0" in survivor["raised"], survivor
    assert survivor["seconds"] < 30


def test_parallel_without_torch_distributed_says_how_to_launch(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ParallelError, match="torchrun"):
        load_model(checkpoints["mistral-window-hf"], parallel="tensor")


def test_config_and_stages() -> None:
    assert ParallelConfig.resolve("tensor", 4) == ParallelConfig(tp=4)
    assert ParallelConfig.resolve({"tp": 2, "pp": 2}, 4).pp == 2
    with pytest.raises(ValueError, match="moe"):
        ParallelConfig(moe="nope")
    with pytest.raises(ValueError, match="unknown field"):
        ParallelConfig.resolve({"tp": 2, "dp": 2}, 4)
    with pytest.raises(ValueError, match="micro_batches"):
        ParallelConfig(pp=2, micro_batches=0)
    pipeline = ParallelConfig(pp=2)
    assert [pipeline.groups_for(n) for n in (1, 4, 15, 16, 40)] == [1, 1, 1, 2, 2]
    assert ParallelConfig(pp=2, micro_batches=3).groups_for(2) == 2
    assert ParallelConfig(tp=2, micro_batches=3).groups_for(40) == 1  # no pipeline: nothing to overlap
    assert [list(stage_layers(5, 3, s)) for s in range(3)] == [[0, 1], [2, 3], [4]]
    assert [core_share([0, 1], r, 2) for r in range(2)] == [[0], [1]]
    assert [core_share(list(range(5)), r, 2) for r in range(2)] == [[0, 1], [2, 3, 4]]
    assert core_share([0, 1], 0, 4) == [0, 1] and core_share([3, 7], 0, 1) == [3, 7]  # too few cores: all


COMPLETE = ["complete", "--max-tokens", "8", "The tramontane is a cold wind that"]


def cli_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")


def one_process(cmd: list[str], message: str | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI's `cmd` in one process (what every parallel run must print)."""
    one = subprocess.run([sys.executable, "-m", "tramontane.cli", *cmd], input=message, capture_output=True,
                         text=True, timeout=600, env=cli_env())
    assert one.returncode == 0, one.stderr
    return one


def test_cli_complete_under_torchrun_prints_the_one_process_completion() -> None:
    env, cmd = cli_env(), COMPLETE
    one = one_process(cmd)
    # SmolLM2's 9 heads do not split in 2: its layers do, in two pipeline stages
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "tramontane.cli", *cmd, "--pp", "2"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and one.stdout.strip()


def test_cli_chat_under_torchrun_answers_as_one_process() -> None:
    env = cli_env()
    cmd = ["chat", "--max-tokens", "6", "--temperature", "0"]
    message = "What is the capital of France?\n"

    def answer(out: str) -> str:  # without the speed, which differs
        return re.sub(r", [0-9.]+ tokens/s", "", out)

    one = one_process(cmd, message)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "tramontane.cli", *cmd, "--pp", "2"],
                         input=message, capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr
    assert answer(two.stdout) == answer(one.stdout) and "[6 tokens" in one.stdout


# ---------------------------------------------------------------------------------- serve under torchrun
PROMPTS = ["The tramontane is a cold wind that", "def fibonacci(n):", "Three winds of the Mediterranean:"]


def _wait_healthy(url: str, proc: subprocess.Popen[str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited ({proc.returncode}): {proc.communicate()[1][-2000:]}"
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


def _answers(url: str) -> list[str]:
    """Greedy completions of PROMPTS, sent at once (they share the engine's steps)."""
    def ask(prompt: str) -> str:
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["text"])

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(ask, PROMPTS))


def _children(parent: int) -> list[int]:
    """The pids of `parent`'s child processes."""
    found = []
    for child in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            if child.name.isdigit() and int((child / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(child.name))
    return found


def _kill_job(launcher: subprocess.Popen[str]) -> None:
    """Kill a torchrun launcher and the workers it started (they live in sessions of their own: killing
    the launcher alone leaves them running)."""
    for pid in [*_children(launcher.pid), launcher.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    launcher.wait(timeout=60)


def _rank_pid(parent: int, rank: int) -> int:
    """The pid of the torchrun worker of `rank` under the launcher `parent`."""
    for pid in _children(parent):
        with contextlib.suppress(OSError):
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    raise LookupError(f"no rank {rank} under {parent}")


def test_serve_under_torchrun_answers_as_one_process_and_stops_with_rank_0() -> None:
    env = cli_env()
    one_port, two_port = free_port(), free_port()
    one = subprocess.Popen([sys.executable, "-m", "tramontane.cli", "serve", "--port", str(one_port)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_healthy(f"http://127.0.0.1:{one_port}", one)
        want = _answers(f"http://127.0.0.1:{one_port}")
    finally:
        one.terminate()
        one.communicate(timeout=60)
    # SmolLM2's 9 heads do not split in 2: its layers do, in two pipeline stages
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                            str(free_port()), "-m", "tramontane.cli", "serve", "--pp", "2", "--port", str(two_port)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_healthy(f"http://127.0.0.1:{two_port}", two)
        assert _answers(f"http://127.0.0.1:{two_port}") == want
        os.kill(_rank_pid(two.pid, 0), signal.SIGTERM)  # a stop of the server, not of the job
        out, err = two.communicate(timeout=60)
    finally:
        _kill_job(two)
    assert two.returncode == 0, err[-3000:]  # rank 1 left when rank 0 told it to, and nothing failed
    assert "tp 1 x pp 2 ranks" in out + err


def test_serve_rank_0_exits_with_an_error_when_a_follower_dies(tmp_path: Path) -> None:
    # ranks started by hand, as torchrun would start them (its own agent would stop rank 0 for us)
    port, http = free_port(), free_port()
    procs = []
    for rank in range(2):
        env = dict(cli_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "tramontane.cli", "serve", "--pp", "2", "--port", str(http)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    try:
        _wait_healthy(f"http://127.0.0.1:{http}", procs[0])
        procs[1].kill()
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        seconds = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 1, err[-3000:]
    assert "tramontane: error: rank 0:" in err and "peer process died" in err, err[-3000:]
    assert seconds < 60  # the next keep-alive finds the peer gone


# ---------------------------------------------------------------------------------- two hosts
class _Hosts:
    """Two network namespaces joined by a veth pair: two hosts of one test, 10.231.<n>.1 and .2, that
    reach nothing else (made here, removed after)."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000}"
        self.names = [f"tram{tag}a", f"tram{tag}b"]
        self.ifaces = [f"tr{tag}a", f"tr{tag}b"]
        self.addrs = [f"10.231.{os.getpid() % 250}.{i + 1}" for i in range(2)]

    def __enter__(self) -> _Hosts:
        try:
            subprocess.run(["ip", "link", "add", self.ifaces[0], "type", "veth", "peer", "name", self.ifaces[1]],
                           check=True, capture_output=True)
            for name, iface, addr in zip(self.names, self.ifaces, self.addrs):
                subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
                subprocess.run(["ip", "link", "set", iface, "netns", name], check=True, capture_output=True)
                for cmd in (["addr", "add", f"{addr}/24", "dev", iface], ["link", "set", iface, "up"],
                            ["link", "set", "lo", "up"]):
                    subprocess.run(["ip", "-n", name, *cmd], check=True, capture_output=True)
        except subprocess.CalledProcessError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.names:  # removing a namespace removes its end of the pair, and so the pair
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.ifaces[0]], capture_output=True)  # if it never moved


def _can_make_hosts() -> bool:
    probe = f"tramprobe{os.getpid()}"
    made = shutil.which("ip") is not None and subprocess.run(["ip", "netns", "add", probe],
                                                             capture_output=True).returncode == 0
    if made:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return made


@pytest.mark.skipif(not _can_make_hosts(), reason="needs `ip netns` (root, CAP_NET_ADMIN) to make two test hosts")
def test_pipeline_between_two_hosts_completes_as_one_process() -> None:
    env, cmd = cli_env(), COMPLETE
    one = one_process(cmd)
    with _Hosts() as hosts:
        port = free_port()
        nodes = [subprocess.Popen(["ip", "netns", "exec", hosts.names[rank], sys.executable, "-m",
                                   "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
                                   str(rank), "--master-addr", hosts.addrs[0], "--master-port", str(port),
                                   "-m", "tramontane.cli", *cmd, "--pp", "2"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=dict(env, GLOO_SOCKET_IFNAME=hosts.ifaces[rank]))
                 for rank in range(2)]
        try:
            outs = [node.communicate(timeout=300) for node in nodes]
        finally:
            for node in nodes:
                _kill_job(node)
    for node, (_, err) in zip(nodes, outs):
        assert node.returncode == 0, err[-3000:]
    assert outs[0][0] == one.stdout and one.stdout.strip()  # host 0 holds rank 0, which prints
    assert outs[1][0] == ""
