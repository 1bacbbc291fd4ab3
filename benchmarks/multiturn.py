"""A multi-turn conversation with and without the reused prefix cache: part of `make bench`.

    python benchmarks/multiturn.py [--turns 10] [--new-tokens 64] [--threads N] [--quick] [--smoke]

Ten turns on the Qwen2-0.5B-shaped checkpoint (benchmarks/checkpoint.py), each user message
about 40 tokens of deterministic text, each reply exactly --new-tokens greedy tokens. Each turn's
time to first token is measured with the KV cache of the last reply reused and without it (the
whole prompt read), the two conversations taking turns so that drift on the machine hits both:

- the REPL path, in this process: ``LocalBackend.generate``, its Reply consumed, then
  ``record_reply`` into a ``ChatSession``, as the REPL does; "without" empties the backend's
  prefix store before each turn;
- a real `glmrepl serve` process with the default --prefix-cache-mb beside one with
  --prefix-cache-mb 0, driven by the ``openai`` client resending the whole history each turn,
  streamed, timed to the first content chunk, reused tokens read from
  ``usage.prompt_tokens_details.cached_tokens``;
- llama.cpp, when its benchmark environment is there (benchmarks/llamacpp.py): the REPL path's
  prompt ids each turn, one ``Llama`` object keeping its evaluated tokens across calls (its
  prompt cache) beside one reset before each turn.

Targets: the last turn's first token within 1.3x of the first turn's with reuse, and without
reuse at least 5x slower than with it at the last turn. Decode tokens/s are printed to show
reuse leaves them unchanged, and whether the greedy replies are the same with and without reuse.
Figures go to the terminal and to benchmarks/results/<date>-multiturn.json. ``--smoke`` plays
all of it on a tiny checkpoint (benchmarks/smoke.py).

This file also runs inside the llama environment (``--llama-child``), which has no glmrepl and
no torch: only the standard library and the helpers beside it that import nothing else
(smoke.py, multiturn_figures.py) are imported at the top.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import random
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import smoke
from multiturn_figures import against_repl, report, summary, without_ids

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TURNS = 10
NEW_TOKENS = 64
USER_TOKENS = 40
QUICK_TURNS, QUICK_NEW_TOKENS = 4, 16
TEXT_SEED = 11

OPENINGS = ("Tell me", "Explain", "Describe", "Remind me", "Help me understand", "Write down", "Guess")
SUBJECTS = (
    "the lighthouse keeper",
    "a ferry captain",
    "the harbour master",
    "an old net mender",
    "the radio operator",
    "a young cartographer",
    "the baker on the quay",
    "two gull watchers",
    "the tide clerk",
    "a retired diver",
)
VERBS = ("remembers", "argues about", "writes about", "asks about", "dreams of", "measures", "paints", "fears")
THINGS = (
    "the winter storms",
    "a broken brass compass",
    "tides under a full moon",
    "the fog horn's timetable",
    "boats that never came back",
    "salt crusted on the windows",
    "a map of the northern reefs",
    "letters from the mainland",
    "the price of lamp oil",
    "seals sleeping on the rocks",
    "a bell ringing under the water",
    "the night the light went out",
)
LINKS = ("and then", "while", "because", "although", "so that", "before", "after")
CLOSERS = ("Why?", "Be brief.", "And then?", "Go on.", "Thanks.", "Who else?", "Is it true?", "Really?", "Say more.")
DANGLING = {"a", "an", "the", "of", "on", "under", "from", "and", "then", "so", "that", "while", "because"}
DANGLING |= {"although", "before", "after", "about", "went", "that", "sleeping", "ringing", "crusted", "never"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, help=f"turns in the conversation (default {TURNS}, {QUICK_TURNS} quick)")
    parser.add_argument(
        "--new-tokens", type=int, help=f"tokens per reply (default {NEW_TOKENS}, {QUICK_NEW_TOKENS} quick)"
    )
    parser.add_argument("--threads", type=int, help="compute threads for every side (default: the physical cores)")
    parser.add_argument(
        "--quick", action="store_true", help=f"a short check: {QUICK_TURNS} turns of {QUICK_NEW_TOKENS}"
    )
    parser.add_argument("--device", default="cpu", help="device mode for glmrepl's sides (default cpu)")
    parser.add_argument("--dtype", default="float32", help="dtype for glmrepl's sides (default float32)")
    parser.add_argument("--cache", type=Path, default=HERE / "cache", help="where the benchmark checkpoint is built")
    parser.add_argument("--results", type=Path, help="where the JSON goes (default benchmarks/results)")
    parser.add_argument(
        "--llama-python",
        type=Path,
        default=HERE / "cache" / "llama-env" / "bin" / "python",
        help="a Python with llama-cpp-python for the optional llama.cpp comparison (skipped when absent)",
    )
    smoke.add_flag(parser)
    args = parser.parse_args()
    args.results = smoke.results_folder(args, HERE / "results")
    if args.smoke:
        args.turns, args.new_tokens = smoke.TURNS, smoke.NEW_TOKENS
    args.turns = args.turns or (QUICK_TURNS if args.quick else TURNS)
    args.new_tokens = args.new_tokens or (QUICK_NEW_TOKENS if args.quick else NEW_TOKENS)
    return args


# -- the conversation -------------------------------------------------------------------


def user_messages(model: Path, turns: int, tokens: int = USER_TOKENS) -> list[str]:
    """Deterministic, varied user messages of about ``tokens`` tokens each (the checkpoint's tokenizer)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    return [_message(random.Random(TEXT_SEED * 1000 + turn), tokenizer, tokens) for turn in range(turns)]


def _message(rng: random.Random, tokenizer, tokens: int) -> str:
    words = [rng.choice(OPENINGS), "how"]
    while len(tokenizer.encode(" ".join(words)).ids) < tokens * 2:  # enough words to cut from
        words += [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(THINGS), rng.choice(LINKS)]
        words = " ".join(words).split()
    # The longest run of words within the budget, so every message is close to it, ending on
    # a word that can end a question.
    while len(words) > 2 and (len(tokenizer.encode(" ".join(words) + "?").ids) > tokens or words[-1] in DANGLING):
        words.pop()
    text = " ".join(words) + "?"
    for closer in rng.sample(CLOSERS, len(CLOSERS)):  # short sentences fill what the cut left
        if len(tokenizer.encode(f"{text} {closer}").ids) <= tokens:
            text = f"{text} {closer}"
    return text


def common_prefix(a: list[int], b: list[int]) -> int:
    shared = 0
    for x, y in zip(a, b):
        if x != y:
            break
        shared += 1
    return shared


# -- the REPL path ------------------------------------------------------------------------


def repl_backend(model: Path, device: str, dtype: str):
    from glmrepl.engine.backend import LocalBackend
    from glmrepl.engine.models.loading import LoadOptions

    backend = LocalBackend()
    backend.load_and_wait(LoadOptions(mode=device, dtype=dtype).for_model(model, model.name))
    return backend


def repl_turn(backend, session, new_tokens: int, fresh: bool) -> dict:
    """One turn as the REPL plays it; the first token is timed from planning (the whole history
    is tokenized then, a cost that grows with the turns), as the user waits for it."""
    from glmrepl.engine import GenerateRequest, SamplingParams, record_reply

    if fresh:
        backend.prefixes.clear()  # nothing to reuse: the whole prompt is read
    started = time.perf_counter()
    reply = backend.generate(GenerateRequest(session, SamplingParams(max_new_tokens=new_tokens, do_sample=False)))
    planned_s = time.perf_counter() - started
    with reply:
        for _delta in reply:
            pass
    record_reply(session, reply)
    stats = reply.stats
    return {
        "prompt_tokens": reply.prompt_tokens,
        "reused_tokens": stats.reused_tokens,
        "first_token_s": planned_s + stats.first_token_s,
        "plan_s": planned_s,
        "decode_tokens_per_s": stats.decode_tokens_per_s,
        "new_tokens": stats.new_tokens,
        "finish_reason": reply.finish_reason,
        "reply": list(stats.new_ids),
        "text": reply.text,
        "prompt_ids": list(reply.run.prompt_ids),
    }


def warm_up(backend) -> None:
    """Kernels chosen, weights paged in, the worker's thread pool built; its cache dropped."""
    from glmrepl.engine.conversation.chat import ChatSession

    session = ChatSession()
    session.add_user("hello there")
    repl_turn(backend, session, 4, fresh=True)
    backend.prefixes.clear()


def repl_conversation(model: Path, args, messages: list[str]) -> list[dict]:
    """Both conversations, a backend each (the store of the one with reuse stays untouched)."""
    from glmrepl.engine.conversation.chat import ChatSession
    from glmrepl.engine.models.manager import free_memory

    backends = [repl_backend(model, args.device, args.dtype), repl_backend(model, args.device, args.dtype)]
    for backend in backends:
        warm_up(backend)
    sessions = (ChatSession(), ChatSession())

    def play(side: int) -> dict:
        return repl_turn(backends[side], sessions[side], args.new_tokens, fresh=side == 1)

    rows = []
    for turn, message in enumerate(messages, start=1):
        print(f"  REPL turn {turn}/{len(messages)} ...", flush=True)
        for session in sessions:
            session.add_user(message)
        rows.append(alternate(turn, play))
    backends.clear()  # the servers load their own copies next
    gc.collect()
    free_memory()
    return rows


def alternate(turn: int, play) -> dict:
    """Both sides of one turn, the first going first on odd turns and second on even ones."""
    sides = {}
    for side in (0, 1) if turn % 2 else (1, 0):
        sides[side] = play(side)
    return {"turn": turn, "with": sides[0], "without": sides[1]}


# -- the served path -----------------------------------------------------------------------


def served_conversation(model: Path, args, messages: list[str]) -> tuple[list[dict], dict]:
    """A server with the prefix cache beside one with it off, the whole history sent each turn."""
    from openai import OpenAI
    from serve import Server

    threads = args.threads
    servers = (
        Server(model, args.device, args.dtype, threads),
        Server(model, args.device, args.dtype, threads, ("--prefix-cache-mb", "0")),
    )
    try:
        clients = [OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="none", max_retries=0) for s in servers]
        for client, server in zip(clients, servers):
            # A plain completion: it warms up as a chat would but leaves no chat template head in
            # the store, so turn 1 reads its whole prompt on both servers.
            client.completions.create(model=server.model_id, prompt="hello there", max_tokens=4, temperature=0)
        histories: tuple[list, list] = ([], [])
        rows = []
        for turn, message in enumerate(messages, start=1):
            print(f"  served turn {turn}/{len(messages)} ...", flush=True)
            for history in histories:
                history.append({"role": "user", "content": message})

            def play(side: int) -> dict:
                return served_turn(clients[side], servers[side].model_id, histories[side], args.new_tokens)

            rows.append(alternate(turn, play))
        health = [server_health(server) for server in servers]
    finally:
        for server in servers:
            server.stop()
    return rows, {"with": health[0], "without": health[1]}


def served_turn(client, model_id: str, history: list[dict], new_tokens: int) -> dict:
    """One streamed request with the whole history; its reply joins the history, as a client keeps it."""
    started = time.perf_counter()
    stream = client.chat.completions.create(
        model=model_id,
        messages=history,
        max_tokens=new_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    first = last = None
    parts, usage, finish = [], None, None
    for chunk in stream:
        now = time.perf_counter()
        usage = chunk.usage or usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta.content:
            first, last = first or now, now
            parts.append(choice.delta.content)
        if choice.finish_reason:
            finish, last = choice.finish_reason, now
    text = "".join(parts)
    history.append({"role": "assistant", "content": text})
    details = getattr(usage, "prompt_tokens_details", None)
    tokens = usage.completion_tokens if usage else None
    return {
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "reused_tokens": getattr(details, "cached_tokens", None),
        "first_token_s": (first or last) - started,
        "decode_tokens_per_s": (tokens - 1) / (last - first) if tokens and tokens > 1 and first else None,
        "new_tokens": tokens,
        "finish_reason": finish,
        "reply": text,
    }


def server_health(server) -> dict | None:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("GET", "/health")
    return json.loads(connection.getresponse().read()).get("prefix_cache")


# -- llama.cpp ------------------------------------------------------------------------------


def llama_conversation(args, threads: int, prompts: list[list[int]]) -> dict:
    """llama.cpp on the REPL path's prompt ids, or {"skipped": why}."""
    import llamacpp

    problem = llamacpp.available(args.llama_python)
    if problem:
        return {"skipped": problem}
    request = {
        "file": str(llamacpp.ensure_float_file(args.cache, args.llama_python, args.smoke)),
        "threads": threads,
        "prompts": prompts,
        "new_tokens": args.new_tokens,
    }
    output = subprocess.run(
        [str(args.llama_python), __file__, "--llama-child"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def _llama_child() -> None:
    """In the llama environment: one Llama object keeping its evaluated tokens across turns (its
    generate() continues from the longest common prefix), one reset before each turn."""
    import llama_cpp

    request = json.loads(sys.stdin.read())
    context = max(len(ids) for ids in request["prompts"]) + request["new_tokens"] + 8
    models = [
        llama_cpp.Llama(
            model_path=request["file"],
            n_ctx=context,
            n_threads=request["threads"],
            n_threads_batch=request["threads"],
            verbose=False,
        )
        for _ in range(2)
    ]
    for model in models:  # warm-up: weights paged in, buffers sized for a prompt of turn 1's length
        _llama_turn(model, request["prompts"][0], 2, fresh=True)
        model.reset()
    rows = []
    for turn, ids in enumerate(request["prompts"], start=1):
        rows.append(alternate(turn, partial(_llama_side, models, ids, request["new_tokens"])))
    print(json.dumps({"llama_cpp": llama_cpp.__version__, "threads": request["threads"], "turns": rows}))


def _llama_side(models: list, ids: list[int], new_tokens: int, side: int) -> dict:
    return _llama_turn(models[side], ids, new_tokens, fresh=side == 1)


def _llama_turn(model, ids: list[int], new_tokens: int, fresh: bool) -> dict:
    if fresh:
        model.reset()  # no evaluated tokens: generate() reads the whole prompt
    # What generate() will keep: the evaluated tokens shared with this prompt, one left to read.
    reused = min(common_prefix(model.input_ids[: model.n_tokens].tolist(), ids), len(ids) - 1)
    started, times, reply = time.perf_counter(), [], []
    for token in model.generate(ids, top_k=1, temp=0.0, reset=True):
        times.append(time.perf_counter())
        reply.append(int(token))
        if len(times) == new_tokens:
            break
    return {
        "prompt_tokens": len(ids),
        "reused_tokens": reused,
        "first_token_s": times[0] - started,
        "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None,
        "new_tokens": len(times),
        "finish_reason": "length",
        "reply": reply,
    }


# -- the run ------------------------------------------------------------------------------


def measure(args, model: Path, threads: int) -> dict:
    messages = user_messages(model, args.turns)
    results: dict = {"messages": messages}
    print(f"REPL path, {args.turns} turns of {args.new_tokens} new tokens, with and without reuse ...", flush=True)
    repl = repl_conversation(model, args, messages)
    results["repl"] = {"turns": repl, "summary": summary(repl, args.new_tokens)}
    print("the same conversation through `glmrepl serve`, with and without its prefix cache ...", flush=True)
    served, health = served_conversation(model, args, messages)
    results["served"] = {"turns": served, "summary": summary(served, args.new_tokens), "health": health}
    results["served"]["against_repl"] = against_repl(served, repl)
    print("llama.cpp on the same prompt ids (optional) ...", flush=True)
    prompts = [row["with"]["prompt_ids"] for row in repl]
    llama = llama_conversation(args, threads, prompts)
    if "turns" in llama:
        llama["summary"] = summary(llama["turns"], args.new_tokens)
    results["llama_cpp"] = llama
    return results


def write_results(results: dict, folder: Path) -> Path:
    for part in ("repl", "served", "llama_cpp"):
        if "turns" in results[part]:
            results[part]["turns"] = without_ids(results[part]["turns"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{datetime.date.today().isoformat()}-multiturn.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return path


def main() -> int:
    if sys.argv[1:2] == ["--llama-child"]:
        _llama_child()
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.path.insert(0, str(HERE))  # the helper modules beside this script
    sys.path.insert(0, str(ROOT))
    args = parse_args()
    import checkpoint
    import machine

    from glmrepl.engine.cpu import machine as cpu

    model = checkpoint.ensure_checkpoint(args.cache, args.smoke)
    cpu.request_threads(args.threads)  # the REPL side, in this process; the servers get --threads
    results = {
        "machine": machine.describe_machine(),
        "checkpoint": checkpoint.shape(args.smoke),
        "placement": f"{args.device} {args.dtype}",
        "threads": cpu.apply_threads(),
        # Other processes on the machine skew timings: the load average tells.
        "load_average_before": os.getloadavg(),
        "turns": args.turns,
        "new_tokens": args.new_tokens,
        "user_tokens": USER_TOKENS,
    }
    results.update(measure(args, model, results["threads"]))
    results["load_average_after"] = os.getloadavg()
    print()
    if args.smoke:
        print(smoke.NOTE)
    print(report(results))
    print(f"\nload average before {results['load_average_before']}, after {results['load_average_after']}")
    print(f"written: {write_results(results, args.results)}")
    if args.smoke:
        print(smoke.NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
