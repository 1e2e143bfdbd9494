"""Measure hetero vs llama.cpp logits on synthetic files, over fresh random prompts.

Prints, per file: the relative error over all positions (median and max over prompts), the
share of positions that agree to float32 rounding (1e-5; with --match-llama-cpp, every position
before the first activation that rounds to the other int8 step) and the share whose own relative
error exceeds 5% (where a top-k expert choice flipped).
Usage: python benchmarks/parity_report.py [--prompts 8] [--tokens 32] [--match-llama-cpp]
(--match-llama-cpp: load_model's option of that name, llama.cpp's MLA form for prompts).
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

import hetero
from hetero.synth.llama_cpp import quiet_stderr
from hetero.synth.writer import write_synthetic

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import V3_MECHANISMS, llama_logits, random_prompt  # noqa: E402

CASES = {
    "tiny F32 (top-2 of 8, softmax)": ("tiny", "F32", {}),
    "v3 F32 2 layers (top-8 of 32, 8 groups, sigmoid+bias, YaRN)": ("v3", "F32", {"n_layer": 2}),
    "tiny F16": ("tiny", "F16", {}),
    "tiny Q8_0, all 8 experts used, V3 mechanisms": ("tiny", "Q8_0", {**V3_MECHANISMS, "n_expert_used": 8}),
    "tiny Q4_K_M, all 8 experts used, V3 mechanisms": ("tiny", "Q4_K_M", {**V3_MECHANISMS, "n_expert_used": 8}),
    "tiny Q8_0, top-2 routing": ("tiny", "Q8_0", {}),
    "tiny Q4_K_M, top-2 routing": ("tiny", "Q4_K_M", {}),
    "v3 Q4_K_M 2 layers, top-8 routing": ("v3", "Q4_K_M", {"n_layer": 2}),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--match-llama-cpp", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print("| file | rel. error median | rel. error max | positions ≤ 1e-5 | positions > 5% |")
        print("|---|---|---|---|---|")
        for label, (preset, quant, over) in CASES.items():
            with quiet_stderr():
                name = Path(tmp) / f"{preset}-{quant}.gguf"
                path = write_synthetic(name, preset, quant, quantizer="llama.cpp", **over)[0]
            model = hetero.load_model(path, match_llama_cpp=args.match_llama_cpp)
            errs, exact, bad = [], [], []
            for _ in range(args.prompts):
                ids = random_prompt(args.tokens, model.tokenizer.bos_id)
                ours, ref = model.logits(ids), llama_logits(path, ids)
                errs.append(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
                per_pos = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
                exact.append(np.mean(per_pos <= 1e-5))
                bad.append(np.mean(per_pos > 0.05))
            print(
                f"| {label} | {np.median(errs):.2e} | {np.max(errs):.2e} | {np.mean(exact):.0%} | {np.mean(bad):.1%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
