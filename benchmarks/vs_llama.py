"""hetero against llama.cpp (llama-cpp-python) on the same GGUF, same threads, interleaved runs.

Usage: python benchmarks/vs_llama.py MODEL [--threads 2] [--prompt-tokens 64] [--gen-tokens 32] [--reps 7] [--json]

The engines take turns, alternating which goes first, so a noisy neighbour hits both alike.
llama.cpp runs in a child process so that neither engine's threads or memory affect the other.
Each repetition prefills a fresh random prompt and then decodes
greedily; llama.cpp runs with logits for the last position only and its default (f16) KV
cache, as `llama-cli` would. Medians, spread (min-max) and hetero/llama.cpp ratios are printed,
and the read bandwidth probe runs between repetitions for the achieved-GB/s figure.
"""

import argparse
import json
import multiprocessing as mp
import statistics
import time

import numpy as np

import hetero
from hetero.bench import prefill_decode
from hetero.synth.llama_cpp import quiet_stderr
from placement.hardware import measure_read_bandwidth


def llama_run(llm, prompt: list[int], gen: int) -> tuple[float, float]:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(gen):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), gen / (t2 - t1)


def llama_server(conn, path: str, n_ctx: int, threads: int, n_batch: int) -> None:
    """Child process: load llama.cpp once, then run (prompt, gen) requests until None."""
    import llama_cpp

    with quiet_stderr():
        llm = llama_cpp.Llama(
            path, n_ctx=n_ctx, n_batch=n_batch, n_threads=threads, n_threads_batch=threads, verbose=False
        )
    conn.send("ready")
    while (req := conn.recv()) is not None:
        conn.send(llama_run(llm, *req))
    llm.close()


def summary(runs: list[float]) -> dict:
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs), "runs": runs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    n_ctx = args.prompt_tokens + args.gen_tokens + 8
    model = hetero.load_model(args.model, n_ctx=n_ctx, gpu_mem="0", threads=args.threads)
    model.warm_up()
    conn, child_conn = mp.Pipe()
    child = mp.get_context("spawn").Process(
        # n_batch >= n_ctx: without logits_all llama-cpp-python keeps n_batch rows of scores and
        # writes the newest token's at its position, which must fit
        target=llama_server,
        args=(child_conn, args.model, n_ctx, args.threads, max(512, n_ctx)),
    )
    child.start()
    conn.recv()

    def llama(prompt, gen):
        conn.send((prompt, gen))
        return conn.recv()

    rng = np.random.default_rng(0)
    vocab = model.config.n_vocab
    bos = model.tokenizer.bos_id
    warm = [bos, *rng.integers(0, vocab, 7).tolist()]
    prefill_decode(model, warm, 2), llama(warm, 2)
    res = {"hetero": ([], []), "llama.cpp": ([], [])}
    probe = []
    for rep in range(args.reps):
        prompt = [bos, *rng.integers(0, vocab, args.prompt_tokens - 1).tolist()]
        order = [("hetero", lambda p=prompt: prefill_decode(model, p, args.gen_tokens)[:2]),
                 ("llama.cpp", lambda p=prompt: llama(p, args.gen_tokens))]  # fmt: skip
        for name, fn in order if rep % 2 == 0 else order[::-1]:
            pre, dec = fn()
            res[name][0].append(pre)
            res[name][1].append(dec)
        probe.append(measure_read_bandwidth(256) / 1e9)
    conn.send(None)
    child.join()
    read = model.plan.decode_read_bytes("cpu")
    report = {
        "model": args.model,
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "reps": args.reps,
        "read_bandwidth_gb_s": summary(probe),
        "decode_weight_bytes_per_token": read,
    }
    for name, (pre, dec) in res.items():
        report[name] = {"prefill_tok_s": summary(pre), "decode_tok_s": summary(dec)}
    for i, phase in enumerate(("prefill_tok_s", "decode_tok_s")):
        ratios = [a / b for a, b in zip(res["hetero"][i], res["llama.cpp"][i], strict=True)]  # same prompt
        report["ratio_" + phase] = summary(ratios)
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"{args.model}: {args.threads} threads, prompt {args.prompt_tokens}, decode {args.gen_tokens}, {args.reps} reps"
    )
    print(f"read bandwidth probe: median {report['read_bandwidth_gb_s']['median']:.1f} GB/s")
    for name in res:
        p, d = report[name]["prefill_tok_s"], report[name]["decode_tok_s"]
        gbs = d["median"] * read / 1e9
        print(
            f"{name:>10}: prefill {p['median']:7.1f} tok/s ({p['min']:.1f}-{p['max']:.1f})   "
            f"decode {d['median']:6.1f} tok/s ({d['min']:.1f}-{d['max']:.1f}) = {gbs:.1f} GB/s of weights"
        )
    for phase in ("prefill_tok_s", "decode_tok_s"):
        r = report["ratio_" + phase]
        print(f"hetero / llama.cpp {phase[:-6]}: median {r['median']:.2f} (per-rep {r['min']:.2f}-{r['max']:.2f})")


if __name__ == "__main__":
    main()
