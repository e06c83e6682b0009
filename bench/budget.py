"""docs/sd35.md's run lengths: the paper's wall-clock hours (Table 1, 8 GPUs) turned into each command's
--steps, from the seconds per step its plan predicts on an 80 GB card.

Seconds per step = the transformer FLOPs of one step per rank (bench.opd_round.mmdit_flops, exact against
FlopCounterMode; LoRA r 32, 512 px, 77 + 128 text tokens) at the model-FLOP utilisation measured for that
kind of call on an H200 in eager mode (docs/bench.md, 2026-11-26: a forward of >= 18 rows 24%, a forward +
backward 22% (of 6 rows 13%), a whole OPD round at 3 prompts 17.7%, each of the dense bf16 matmul rate
measured in the same run, 784 TFLOP/s; an H100 SXM has the same compute and less memory bandwidth), plus
the evaluations every --eval_every steps (40-step ODE). The VAE, the text
encoders and the reward models are left out (a few percent of a step). An estimate, not a measurement: no
GPU was lent for it; the first hour of a run gives the real s/step in its metrics.jsonl (sec/*).

Run:
    python -m bench.budget            # the table docs/sd35.md quotes
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bench.opd_round import mmdit_flops
from bench.sd35_plans import CARDS, FIXTURE, dry_run, page_commands, stand_in

PEAK = 784e12     # the dense bf16 matmul rate measured beside those MFUs (docs/bench-gpu/levers.json)
MFU = {"forward": 0.24, "train": 0.22, "train_small": 0.13, "opd_round": 0.177}
PAPER_HOURS = {"nft.py --task geneval": 46.9, "teacher_rl.py --task ocr": 33.2,
               "teacher_rl.py --task aesthetic": 85.8, "opd.py": 11.3}  # Table 1 (paper section 9)


def seconds(script: str, cfg: dict, world: int) -> tuple[float, float]:
    """(seconds per step, seconds per evaluation) per rank of a resolved config on `world` ranks."""
    c = json.loads((FIXTURE / "transformer" / "config.json").read_text())
    n_img = (cfg["height"] // 16) * (cfg["width"] // 16)  # VAE factor 8 x patch 2
    fwd, bwd = mmdit_flops(c, n_img, 77 + 128, cfg["lora_rank"])
    K = int(cfg["num_steps"] * cfg["timestep_fraction"])
    w = 1 if cfg["guidance"] == 1.0 else 2
    if script == "opd.py":
        P, tasks = cfg["prompts_per_batch"] // world, 3
        teacher_rows = K * P * (1 + 2 + 2)  # the GenEval teacher samples without CFG, the others with it
        flops = tasks * (cfg["num_steps"] * 2 * P * fwd + 2 * K * P * (fwd + bwd)) + teacher_rows * fwd
        step = flops / (PEAK * MFU["opd_round"])
    else:
        B = cfg["batch"] // world
        rollout = cfg["num_steps"] * w * B * fwd
        train = K * w * B * (fwd + bwd)
        extra = K * w * B * fwd * ((cfg.get("kl_beta", 0) > 0) + (script == "nft.py") * (1 + (cfg.get("ref_beta", 0) > 0)))
        small = w * cfg["train_batch"] < 6
        step = (rollout + extra) / (PEAK * MFU["forward"]) + train / (PEAK * MFU["train_small" if small else "train"])
    prompts = -(-cfg["eval_prompts"] // world) * (3 if script == "opd.py" else 1)
    evaluation = cfg["eval_steps"] * (2 if script == "opd.py" else w) * prompts * fwd / (PEAK * MFU["forward"])
    return step, evaluation


def main():
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        env = stand_in(root)
        print("| command | planned s/step (80 GB) | s per evaluation | paper's hours | --steps |")
        print("|---|---:|---:|---:|---:|")
        for command in page_commands():
            name = " ".join(command[2:5])
            hours = next((h for key, h in PAPER_HOURS.items() if name.startswith(key)), None)
            if hours is None:
                continue
            _, cfg = dry_run(command, root, env, CARDS["80 GB"])
            step, evaluation = seconds(command[2], cfg, 8)
            per_step = step + evaluation / cfg["eval_every"]
            print(f"| `{name}` | {step:.1f} | {evaluation:.0f} | {hours} | {round(hours * 3600 / per_step, -1):.0f} |")


if __name__ == "__main__":
    main()
